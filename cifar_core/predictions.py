"""The prediction images a run logs as `examples`, and their caption format, which `agent report`
reads back (parse_caption): one owner for both sides. Light to import (no torch): the report
uses it too."""

import re

CAPTION = re.compile(r"Pred: (.*), Label: (.*)")


def caption(predicted: str, label: str) -> str:
    return f"Pred: {predicted}, Label: {label}"


def parse_caption(text: str) -> tuple[str, str] | None:
    """(predicted, label) of a caption written by `caption`, or None."""
    match = CAPTION.fullmatch(text)
    return (match[1], match[2]) if match else None


def log_predictions(logger, net, images, labels, classes, step: int, **inference) -> None:
    """Logs `images` (uint8 N x 3 x H x W) with the net's predictions (`inference`: predict's options),
    once per run: encoding them every epoch cost more than the epochs of a short trial."""
    from cifar_core.evaluate import predict

    predicted = predict(net, images, **inference).argmax(-1).tolist()
    logger.log_image(key="examples", images=[img.permute(1, 2, 0).cpu().numpy() for img in images],
                     caption=[caption(classes[p], classes[y]) for p, y in zip(predicted, labels.tolist())], step=step)
