"""The training engine shared by pretraining and fine-tuning.

    config.py       the stages' typed configs (one section tree)
    loop.py         run_training: loaders, engine, resume, steps, evaluation, checkpoints, export
    engine.py       the DeepSpeed engine (the one place a model is wrapped), optimizer, lr schedule
    checkpoint.py   resumable checkpoints and the export of their weights
    distributed.py  rank/world facts and the few collectives the loop needs
    launch.py       --nproc / --hostfile: relaunching a command as N DeepSpeed ranks
"""
