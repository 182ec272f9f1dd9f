"""What a run tells its user: the original's console lines, tqdm bars, TensorBoard and metrics.csv.

Only the primary process reports. The console keeps the original's formats
(``Epoch: [E][i/N] ...`` every ``-p`` batches and `` * Prec@1 X Prec@5 Y``)
so existing log parsers keep working; on a terminal, tqdm bars replace the
per-batch lines.
"""
import csv
import logging
import os
import sys
from typing import Dict, List, Optional

from tqdm import tqdm

logger = logging.getLogger("eca")

CSV_FIELDS = [
    "epoch", "lr", "train_loss", "train_prec1", "train_prec5", "val_loss", "val_prec1", "val_prec5",
    "ema_prec1", "ema_prec5", "images_per_sec", "epoch_seconds", "unreadable_images",
]


def setup_logging(is_primary: bool, samples: bool = False) -> None:
    """Plain lines on stdout for the primary process; warnings and errors only from the others.

    With ``samples`` (``--log-samples``) every process also says which images each training step trained.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.INFO if is_primary else logging.WARNING)
    # A logger's own level decides; its records then reach the root's handler on every process.
    logging.getLogger("eca.samples").setLevel(logging.DEBUG if samples else logging.WARNING)


class AverageMeter:
    """The latest value and the running average, weighted by batch size."""

    def __init__(self) -> None:
        self.val = 0.0
        self.sum = 0.0
        self.count = 0

    def update(self, value: float, n: int = 1) -> None:
        self.val = float(value)
        self.sum += float(value) * n
        self.count += n

    @property
    def avg(self) -> float:
        return self.sum / self.count if self.count else 0.0


class Progress:
    """Per-batch reporting: the original's line every ``print_freq`` batches, or a tqdm bar on a terminal."""

    def __init__(self, total: int, print_freq: int, enabled: bool, description: str, start: int = 0):
        self.total = total
        self.print_freq = print_freq
        self.enabled = enabled
        self.bar: Optional[tqdm] = None
        if enabled and sys.stdout.isatty():
            self.bar = tqdm(total=total, initial=start, desc=description, dynamic_ncols=True, leave=False)

    def step(self, index: int, line: str, postfix: Dict[str, str]) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(postfix, refresh=False)
        elif index % self.print_freq == 0 or index == self.total - 1:
            logger.info(line)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def train_line(epoch: int, index: int, total: int, meters: Dict[str, AverageMeter]) -> str:
    m = meters
    return (
        f"Epoch: [{epoch}][{index}/{total}]\t"
        f"Time {m['batch_time'].val:.3f} ({m['batch_time'].avg:.3f})\t"
        f"Data {m['data_time'].val:.3f} ({m['data_time'].avg:.3f})\t"
        f"Loss {m['loss'].val:.4f} ({m['loss'].avg:.4f})\t"
        f"Prec@1 {m['top1'].val:.3f} ({m['top1'].avg:.3f})\t"
        f"Prec@5 {m['top5'].val:.3f} ({m['top5'].avg:.3f})"
    )


def test_line(index: int, total: int, meters: Dict[str, AverageMeter]) -> str:
    m = meters
    return (
        f"Test: [{index}/{total}]\t"
        f"Time {m['batch_time'].val:.3f} ({m['batch_time'].avg:.3f})\t"
        f"Loss {m['loss'].val:.4f} ({m['loss'].avg:.4f})\t"
        f"Prec@1 {m['top1'].val:.3f} ({m['top1'].avg:.3f})\t"
        f"Prec@5 {m['top5'].val:.3f} ({m['top5'].avg:.3f})"
    )


def summary_line(prec1: float, prec5: float) -> str:
    """The original's closing line of every validation, which log parsers look for."""
    return f" * Prec@1 {prec1:.3f} Prec@5 {prec5:.3f}"


class MetricsWriter:
    """TensorBoard events and ``metrics.csv`` (one row per epoch) in the output folder; nothing when disabled.

    Disabled on every process but the primary, so that the loop need not ask which process it runs in.
    """

    def __init__(self, output_dir: str, *, tensorboard: bool, first_epoch: int, enabled: bool = True):
        self.enabled = enabled
        self.csv_path = os.path.join(output_dir, "metrics.csv")
        self.writer = None
        if not enabled:
            return
        self._drop_rows_from(first_epoch)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # Events from a step on that an earlier run of this folder wrote (a resumed or replaced run) are
            # hidden, so that its curves continue instead of being drawn twice.
            self.writer = SummaryWriter(log_dir=output_dir, purge_step=first_epoch)

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _drop_rows_from(self, epoch: int) -> None:
        # A resumed run repeats the epochs after its checkpoint; their old rows would be duplicates.
        if not os.path.exists(self.csv_path):
            return
        with open(self.csv_path, newline="") as handle:
            rows = [row for row in csv.DictReader(handle) if int(row["epoch"]) < epoch]
        self._write_rows(rows)

    def _write_rows(self, rows: List[Dict[str, object]]) -> None:
        tmp = self.csv_path + ".tmp"
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.csv_path)

    def add_scalars(self, values: Dict[str, float], step: int) -> None:
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(name, value, step)

    def add_epoch(self, row: Dict[str, object]) -> None:
        if not self.enabled:
            return
        exists = os.path.exists(self.csv_path)
        with open(self.csv_path, "a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
            if not exists:
                writer.writeheader()
            writer.writerow({key: row.get(key, "") for key in CSV_FIELDS})
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def report_epoch(metrics: MetricsWriter, epoch: int, *, lr: float, train, val, ema) -> None:
    """One epoch's results: a row of metrics.csv, TensorBoard scalars and the console summary.

    ``train`` is None for an epoch resumed after its last batch; ``ema`` is None without ``--model-ema``.
    """
    unreadable = len(val.unreadable) + (len(train.unreadable) if train is not None else 0)
    row = {"epoch": epoch, "lr": lr, "val_loss": val.loss, "val_prec1": val.prec1, "val_prec5": val.prec5,
           "unreadable_images": unreadable}
    scalars = {"val/loss": val.loss, "val/prec1": val.prec1, "val/prec5": val.prec5}
    summary = f"Epoch {epoch} done: lr {lr:.4g}, val Prec@1 {val.prec1:.3f}"
    if train is not None:
        row.update(train_loss=train.loss, train_prec1=train.prec1, train_prec5=train.prec5,
                   images_per_sec=round(train.images_per_sec, 2), epoch_seconds=round(train.seconds, 2))
        scalars.update({"train/loss": train.loss, "train/prec1": train.prec1, "train/prec5": train.prec5,
                        "train/lr": lr, "train/images_per_sec": train.images_per_sec})
        summary += f", train loss {train.loss:.4f}, {train.images_per_sec:.1f} images/s"
    if ema is not None:
        row.update(ema_prec1=ema.prec1, ema_prec5=ema.prec5)
        scalars.update({"val_ema/prec1": ema.prec1, "val_ema/prec5": ema.prec5})
    metrics.add_scalars(scalars, epoch)
    metrics.add_epoch(row)
    logger.info("%s, %d unreadable images skipped", summary, unreadable)
