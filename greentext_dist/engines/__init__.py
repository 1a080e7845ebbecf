"""Engines wrap a model and its optimizer; the training loop talks to every engine the same way:

    engine.forward(x) -> logits                 (autocast inside)
    with engine.accumulating(last): ...         (skip gradient sync until the last micro-batch)
    engine.backward(loss)                       (loss is already divided by the step's global token count)
    engine.step(grad_clip) -> grad_norm tensor  (clip, optimizer step, zero grads)
    engine.set_lr(lr); engine.save_state(dir); engine.load_state(dir); engine.export_hf(dir, max_shard_size)
"""
