"""The parity check every non-LLaVA family's test runs: a padded batch of the Flax port against
transformers' eager attention one sample at a time (logits 1e-4 relative, probe rows 1e-5, image
mask, entropies raw and / ln N 1e-4)."""

import math

import numpy as np


def entropy_numpy(row, keep):
    """BYE's image entropy of one [heads, S] row over the positions `keep`, in float64 numpy."""
    m = row.astype(np.float64).mean(axis=0)[keep]
    p = m / m.sum()
    return float(-(p * np.log(p + 1e-8)).sum())


def assert_batch_matches_reference(batch, logits, rows, ours, counts, samples, reference, image_token_id):
    """`reference(image, question)` -> (logits [S, V], per-layer rows [heads, S], input ids) of one
    unpadded sample; `ours` [B, L] the port's entropies, `counts` [B] its image-token counts."""
    for b, (image, question) in enumerate(samples):
        ref_logits, ref_rows, ref_ids = reference(image, question)
        real = batch.attention_mask[b].astype(bool)
        np.testing.assert_array_equal(batch.input_ids[b][real], ref_ids)
        got = logits[b][real]
        assert got.shape == ref_logits.shape
        rel = np.abs(got - ref_logits).max() / np.abs(ref_logits).max()
        assert rel < 1e-4, f"sample {b}: logits relative error {rel}"
        keep = ref_ids == image_token_id
        np.testing.assert_array_equal(batch.image_mask[b][real], keep)
        n = int(keep.sum())
        assert n == counts[b]
        for layer, ref_row in enumerate(ref_rows):
            row = rows[layer][b][:, real]
            np.testing.assert_allclose(row, ref_row, atol=1e-5, err_msg=f"sample {b} layer {layer}")
            assert np.all(rows[layer][b][:, ~real] == 0), "padding keys must get zero attention"
            h_ref = entropy_numpy(ref_row, keep)
            assert abs(ours[b, layer] - h_ref) < 1e-4, (b, layer, ours[b, layer], h_ref)
            assert abs(ours[b, layer] / math.log(n) - h_ref / math.log(n)) < 1e-4
