"""The train entry: resumes from the latest checkpoint, logs each step, stops when asked."""

import json

import torch
from safetensors.torch import save_file

import factory_job

from .model import TinyCNN, batch

BATCH = 32


def run():
    p = factory_job.params()
    steps = p.get("steps", 200)
    channels = p.get("channels", 8)
    every = p.get("checkpoint_every", 50)
    torch.manual_seed(0)
    model = TinyCNN(channels)
    optimizer_cls = torch.optim.Adam if p.get("optimizer", "adam") == "adam" else torch.optim.SGD
    optimizer = optimizer_cls(model.parameters(), lr=p.get("learning_rate", 0.01))
    generator = torch.Generator().manual_seed(1)
    start = 0

    state = factory_job.latest()
    if state is not None:  # a resumed attempt (preempted, or its worker lost) continues here
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        start = int(state["step"])
        print(f"resumed from step {start}")

    def checkpoint(step: int) -> None:
        factory_job.save(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "generator": generator.get_state(),
                "step": torch.tensor(step),
            },
            step=step,
        )

    loss_fn = torch.nn.CrossEntropyLoss()
    for step in range(start + 1, steps + 1):
        images, labels = batch(generator, BATCH, augment=p.get("augment", False))
        logits = model(images)
        loss = loss_fn(logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        accuracy = (logits.argmax(dim=1) == labels).float().mean().item()
        factory_job.log(step=step, loss=loss.item(), accuracy=accuracy)
        if step % every == 0 or step == steps:
            checkpoint(step)
        if factory_job.should_stop():  # preempted or cancelled: checkpointed, so hand back
            checkpoint(step)
            return

    with torch.no_grad():
        images, labels = batch(torch.Generator().manual_seed(2), 256, augment=False)
        val_accuracy = (model(images).argmax(dim=1) == labels).float().mean().item()
    factory_job.log(step=steps, split="val", accuracy=val_accuracy)
    output = factory_job.checkpoint_dir().parent / "output"
    output.mkdir(parents=True, exist_ok=True)
    weights = output / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    factory_job.register_model(weights, {"channels": channels, "size": 8, "classes": 2})
    print(json.dumps({"val_accuracy": val_accuracy}))
