"""LoRA fine-tuning (python -m bye_jax.train); `finetune` is the library entry point."""


def finetune(*args, **kwargs):
    """See bye_jax.train.main.finetune."""
    from bye_jax.train.main import finetune as _finetune

    return _finetune(*args, **kwargs)
