"""python -m bye_jax.train --config=bye_jax/configs/train.py --config.model=CKPT ... --workdir=OUT"""

from bye_jax.train.main import main

main()
