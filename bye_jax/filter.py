"""BYE filter: find poisoned samples in a fine-tuning upload (python -m bye_jax.filter).

The detection pipeline (extract -> profile layers -> cluster) lands with the detection issue;
until then this command states so and exits non-zero.
"""

import sys


def main(argv: list[str] | None = None) -> int:
    del argv
    print("bye_jax.filter: the detection pipeline is not implemented yet (see the open issues).",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
