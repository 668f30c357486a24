"""Config pieces for the data sources (a helper of the config files, not a config itself).

Every data section (``config.data``; eval's ``config.test`` / ``config.triggered``) gets
``source`` ("llava_json" | "tfds"), ``keep_ids``, ``max_aspect_ratio`` and a ``tfds`` sub-config; see
bye_jax/data/sources.py and bye_jax/data/tfds.py.
"""

import ml_collections


def tfds_config(split: str = "train") -> ml_collections.ConfigDict:
    t = ml_collections.ConfigDict()
    t.name = ""                     # prepared TFDS dataset ("name[/config][:version]") under data_dir
    t.data_dir = ""                 # default: TFDS's own ($TFDS_DATA_DIR or ~/tensorflow_datasets)
    t.builder_dir = ""              # instead of name: a prepared builder directory (with dataset_info.json)
    t.split = split                 # any TFDS split expression, e.g. "train[:1000]"
    t.id_key = "id"                 # "" -> ids "<split>:<index>"; nested features as "a/b"
    t.image_key = "image"           # an Image feature
    t.question_key = "question"     # text; "<image>" removed, whitespace stripped
    t.answer_key = "answer"         # text; "" -> no answers
    t.poisoned_key = ""             # optional boolean ground truth (else "poison" in the id)
    return t


def add_source(section: ml_collections.ConfigDict, split: str = "train") -> ml_collections.ConfigDict:
    """Adds source / keep_ids / tfds to a data section that has annotations and image_root."""
    section.source = "llava_json"   # llava_json (annotations + image_root) | tfds (the tfds keys below)
    section.keep_ids = ""           # optional JSON (e.g. a filter's clean.json): use only the ids it lists
    section.max_aspect_ratio = 64.0  # skip images whose long side is > this x the short side (0: no limit)
    section.tfds = tfds_config(split)
    return section
