"""Fine-tuning a converted model: plain PyTorch, resumable to the bit, DDP under torchrun.

config.py (TrainConfig), settings.py (the command's arguments -> TrainConfig),
run_folder.py (the run's files and lock), parts.py (model, teacher, data, optimizer),
state.py (position and resume state), optim.py (groups, schedules, stages), steps.py (a
step, a validation, an epoch's row), loop.py (the epoch loop), trainer.py (all of it).
"""
