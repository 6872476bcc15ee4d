"""One training trial: the model, its optimizer and precision, the train loop, checkpoints, launch."""
