"""DeepSpeed ZeRO-3 training of TwinFlow models: config, trainer loop, shard EMA, checkpoints, export.

Heavy modules (DeepSpeed, diffusers) are imported from their own submodules, so reading a config
(``twinflow.training.config``) stays light.
"""
