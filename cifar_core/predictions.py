"""Which validation images a run shows with its best model's predictions: every class alike, mistakes first."""

import torch

from cifar_core.evaluate import predict

EXAMPLES = 32  # about as many images as the seed logged, spread over the classes
MOST_PER_CLASS, MOST_CLASSES = 4, 64  # a few of each class; one each of the first 64 when there are more


def example_rows(labels, num_classes: int, predicted_of) -> list[tuple[int, int]]:
    """(row, predicted class) of the images of a split to show: every class (up to MOST_CLASSES), the same few of
    each, its mistakes first (up to half of them, one at least), then what it got right. `predicted_of(rows)`
    predicts those rows only: a few candidates a class are scored, never the whole split."""
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


def shown_examples(net, split, classes: tuple[str, ...], **inference) -> tuple[list, list[str], list[str]]:
    """The images of `split` (a data.Split) that example_rows picks, as H x W x 3 uint8 arrays, with the net's
    predictions (`inference`: predict's options) and the labels, as class names."""
    def predicted_of(rows):
        return predict(net, split[rows.to(split.labels.device)], **inference).argmax(-1)

    rows, predicted = zip(*example_rows(split.labels, len(classes), predicted_of))
    rows = torch.tensor(rows, device=split.labels.device)
    images = [image.permute(1, 2, 0).cpu().numpy() for image in split[rows]]
    return images, [classes[p] for p in predicted], [classes[y] for y in split.labels[rows].tolist()]
