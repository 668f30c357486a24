"""python -m bye_jax.eval (see bye_jax/eval/main.py)."""

from bye_jax.eval.main import main

main()
