"""clipcoco model side: config, model, loss, training loop, evaluation."""
