"""The train entry: resumes from the latest checkpoint, logs each step, stops when asked.

Given a model version (the job's `model`), it fine-tunes it: it starts from those weights, and,
given a dataset too, trains on its labelled rows instead of the synthetic bars.
"""

import csv
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import factory_job

from .model import SIZE, TinyCNN, batch
from .predict import COLUMNS, LABELS

BATCH = 32


def run():
    p = factory_job.params()
    steps = p.get("steps", 200)
    channels = p.get("channels", 8)
    every = p.get("checkpoint_every", 50)
    torch.manual_seed(0)
    base = factory_job.inputs().get("model")
    if base is not None:  # a fine-tune: the registered version's shape and weights
        channels = json.loads(Path(base, "config.json").read_text())["channels"]
    model = TinyCNN(channels)
    if base is not None:
        model.load_state_dict(load_file(str(Path(base, "model.safetensors"))))
        print("fine-tuning the registered version")
    rows = _labelled_rows(factory_job.inputs().get("dataset"))
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
        if rows is None:
            images, labels = batch(generator, BATCH, augment=p.get("augment", False))
        else:
            pick = torch.randint(0, len(rows[1]), (BATCH,), generator=generator)
            images, labels = rows[0][pick], rows[1][pick]
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


def _labelled_rows(path: str | None):
    """A CSV's rows as (images, labels): the columns p0 ... p63 and `label` (horizontal or
    vertical); None without a dataset. A row that does not fit is the job's input error."""
    if path is None:
        return None
    images, labels = [], []
    with open(path, newline="", encoding="utf-8") as file:
        for number, row in enumerate(csv.DictReader(file), start=2):
            try:
                images.append([float(row[name]) for name in COLUMNS])
                labels.append(LABELS.index(row["label"]))
            except (KeyError, TypeError, ValueError):
                raise factory_job.BadInput(
                    f"Line {number} of the dataset needs numbers p0 to p63 and a label "
                    f"({' or '.join(LABELS)})."
                ) from None
    if not labels:
        raise factory_job.BadInput("The dataset has no rows to fine-tune on.")
    return torch.tensor(images).view(-1, 1, SIZE, SIZE), torch.tensor(labels)
