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


EXAMPLES = 32  # about as many images as the seed logged, spread over the classes
MOST_PER_CLASS, MOST_CLASSES = 4, 64  # a few of each class; one each of the first 64 when there are more


def example_rows(labels, num_classes: int, predicted_of) -> list[tuple[int, int]]:
    """(row, predicted class) of the images of a split to show: every class (up to MOST_CLASSES), the same few of
    each, its mistakes first (up to half of them, one at least), then what it got right. `predicted_of(rows)`
    predicts those rows only: a few candidates a class are scored, never the whole split."""
    import torch

    classes = range(min(num_classes, MOST_CLASSES))
    per_class = max(1, min(MOST_PER_CLASS, EXAMPLES // max(1, len(classes))))
    candidates = [torch.nonzero(labels.cpu() == c).flatten()[:2 * per_class] for c in classes]
    predicted = predicted_of(torch.cat(candidates)).cpu().split([len(rows) for rows in candidates])
    chosen = []
    for c, rows, guesses in zip(classes, candidates, predicted):
        pairs = list(zip(rows.tolist(), guesses.tolist()))
        wrong, right = [p for p in pairs if p[1] != c], [p for p in pairs if p[1] == c]
        mistakes = wrong[:max(1, per_class // 2)]
        chosen += (mistakes + right + wrong[len(mistakes):])[:per_class]
    return chosen


def log_predictions(logger, net, split, classes, step: int, **inference) -> None:
    """Logs images of `split` (a data.Split) with the net's predictions (`inference`: predict's options), once per
    run (encoding them every epoch cost more than the epochs of a short trial): `example_rows` of it."""
    import torch

    from cifar_core.evaluate import predict

    def predicted_of(rows):
        return predict(net, split[rows.to(split.labels.device)], **inference).argmax(-1)

    rows, predicted = zip(*example_rows(split.labels, len(classes), predicted_of))
    rows = torch.tensor(rows, device=split.labels.device)
    images, labels = split[rows], split.labels[rows].tolist()
    logger.log_image(key="examples", images=[img.permute(1, 2, 0).cpu().numpy() for img in images],
                     caption=[caption(classes[p], classes[y]) for p, y in zip(predicted, labels)], step=step)
