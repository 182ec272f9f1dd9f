"""The command line of ``main.py`` and ``light_main.py``: flags, recipes and YAML configs.

Every flag of the original keeps its name and meaning; new flags are named as
in torchvision's reference scripts. Precedence, lowest first: the script's
recipe (ResNet or MobileNetV2), a ``--config`` YAML file, the command line.
"""
import argparse
import os
import sys
from typing import Any, Dict, Iterable, Optional, Sequence

import yaml

import models
from models.eca_mobilenetv2 import NUM_BLOCKS as MOBILENET_BLOCKS
from models.kernel_sizes import parse_kernel_sizes

from models.fused import IMPLS as ECA_IMPLS

from .checkpoint import Checkpoint
from .data.transforms import DEFAULT_CROP_SIZE, evaluation_sizes, saved_size
from .errors import UsageError
from .identify import architecture_of, check_ksize_applies

# The two recipes of the paper (SPEC: Recipes). The scripts differ only in these.
RECIPES: Dict[str, Dict[str, Any]] = {
    "resnet": dict(
        arch="eca_resnet50", epochs=100, batch_size=256, lr=0.1, momentum=0.9, weight_decay=1e-4,
        lr_scheduler="step", lr_step_size=30, lr_gamma=0.1,
    ),
    "mobilenet": dict(
        arch="eca_mobilenet_v2", epochs=400, batch_size=96, lr=0.045, momentum=0.9, weight_decay=4e-5,
        lr_scheduler="exponential", lr_step_size=1, lr_gamma=0.98,
    ),
}
ARCH_NAMES = sorted(models.ARCHITECTURES)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line (a :class:`UsageError`) instead of usage text and exit."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{message} (see --help)")


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds each option's default to its help, unless the help says it already, there is none, or it is a switch.

    A switch's default is its absence: ``--no-tensorboard`` must not say "(default: True)".
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.nargs == 0 or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def flag_name(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def require_at_least(args: argparse.Namespace, minimum: float, *names: str) -> None:
    """One line naming the first of ``names`` below ``minimum``: 'must be a positive integer' or 'must be 0 or more'."""
    wanted = "a positive integer" if minimum == 1 else f"{minimum:g} or more"
    for name in names:
        if getattr(args, name) < minimum:
            raise UsageError(f"{flag_name(name)} must be {wanted}")


def build_parser(recipe: str) -> ArgumentParser:
    defaults = RECIPES[recipe]
    parser = ArgumentParser(
        description=f"Train or evaluate ECA-Net on ImageNet ({recipe} recipe).",
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument("data", metavar="DATA", help="folder with train/CLASS/*.JPEG and val/CLASS/*.JPEG")

    original = parser.add_argument_group("flags of the original")
    original.add_argument("-a", "--arch", metavar="ARCH", choices=ARCH_NAMES, default=None,
                          help=f"one of: {' | '.join(ARCH_NAMES)} (default: {defaults['arch']}, or what --resume holds)")
    original.add_argument("--ksize", default=None, help="ECA kernel sizes: '3557', '3,5,5,7', '5' or 'adaptive' "
                          "(default: the released model's, or read from --resume)")
    original.add_argument("-j", "--workers", type=int, default=None, help="data loading workers per process "
                          "(default: the CPUs of this machine over its processes, at most 8)")
    original.add_argument("--epochs", type=int, help="number of epochs to train")
    original.add_argument("--start-epoch", type=int, default=None, help="epoch to start at (default: 0, or the resumed one)")
    original.add_argument("-b", "--batch-size", type=int, help="batch of one machine, split over its processes")
    original.add_argument("--lr", "--learning-rate", dest="lr", type=float, help="initial learning rate")
    original.add_argument("--momentum", type=float, help="SGD momentum")
    original.add_argument("--wd", "--weight-decay", dest="weight_decay", type=float, help="SGD weight decay (L2)")
    original.add_argument("-p", "--print-freq", type=int, default=10, help="print every N batches")
    original.add_argument("--resume", default="", metavar="PATH",
                          help="checkpoint to resume (or, with -e, to evaluate); 'auto': OUTPUT/checkpoint.pth.tar "
                               "when it exists, else a fresh start")
    original.add_argument("-e", "--evaluate", action="store_true", help="evaluate on val/ and exit")
    original.add_argument("--pretrained", action="store_true", help="start from released weights: needs --init-from FILE")
    original.add_argument("--world-size", type=int, default=-1, help="number of nodes (with --dist-url)")
    original.add_argument("--rank", type=int, default=-1, help="rank of this node (with --dist-url)")
    original.add_argument("--dist-url", default=None, help="URL to set up distributed training, e.g. tcp://HOST:PORT")
    original.add_argument("--dist-backend", default=None, help="nccl on GPUs, gloo on the CPU (default)")
    original.add_argument("--seed", type=int, default=None, help="seed for exactly reproducible runs")
    original.add_argument("--gpu", type=int, default=None, help="train on this one GPU")
    original.add_argument("--action", default="", help="tag appended to the output folder name")

    run = parser.add_argument_group("run")
    run.add_argument("--config", default=None, help="YAML file of defaults (see configs/); flags override it")
    run.add_argument("--output-dir", default=None, help="where checkpoints and logs go (default: runs/<arch>_<action>)")
    run.add_argument("--overwrite", action="store_true",
                     help="replace the run that --output-dir holds, instead of refusing to touch it")
    run.add_argument("--save-every-steps", type=int, default=None, metavar="N",
                     help="also save the checkpoint every N training steps, in mid-epoch")
    run.add_argument("--save-every-minutes", type=float, default=None, metavar="M",
                     help="also save the checkpoint every M minutes, in mid-epoch")
    run.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    run.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none", help="mixed precision")
    run.add_argument("--channels-last", action="store_true", help="NHWC memory format (faster on GPUs)")
    run.add_argument("--compile", action="store_true", help="torch.compile the model")
    run.add_argument("--eca-impl", choices=ECA_IMPLS, default="auto",
                     help="ECA block implementation: auto picks per device, dtype and mode; reference is the "
                          "plain paper layer; cpu and triton force a fast path")
    run.add_argument("--sync-bn", action="store_true", help="synchronise BatchNorm statistics across processes")
    run.add_argument("--dist-timeout", type=float, default=30.0, help="minutes before a stuck collective fails the job")
    run.add_argument("--strict-data", action="store_true", help="stop on an unreadable image instead of skipping it")
    run.add_argument("--num-classes", type=int, default=None, help="default: the class folders in DATA/train")
    run.add_argument("--no-tensorboard", dest="tensorboard", action="store_false", help="write no TensorBoard events")
    run.add_argument("--log-samples", action="store_true",
                     help="every process logs the dataset indices each of its training steps trained")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--lr-scheduler", choices=("step", "cosine", "exponential"), help="learning-rate schedule")
    optim.add_argument("--lr-step-size", type=int, help="epochs between lr drops (step)")
    optim.add_argument("--lr-gamma", type=float, help="lr factor per drop (step) or per epoch (exponential)")
    optim.add_argument("--lr-min", type=float, default=0.0, help="final lr of the cosine schedule")
    optim.add_argument("--warmup-epochs", type=float, default=0.0, help="linear warm-up from lr/100, per iteration")
    optim.add_argument("--label-smoothing", type=float, default=0.0, help="cross-entropy label smoothing, in [0, 1)")
    optim.add_argument("--clip-grad-norm", type=float, default=None, help="clip the gradient norm to this value")
    optim.add_argument("--model-ema", action="store_true", help="keep an exponential moving average of the weights")
    optim.add_argument("--model-ema-decay", type=float, default=0.9998, help="EMA decay per step")
    optim.add_argument("--model-ema-steps", type=int, default=32, help="update the EMA every N steps")

    augment = parser.add_argument_group("data and augmentation")
    augment.add_argument("--train-crop-size", type=int, default=None,
                         help="default: the --resume checkpoint's, else 224")
    augment.add_argument("--val-resize-size", type=int, default=None,
                         help="default: the --resume checkpoint's, else 256 (256/224 of --val-crop-size)")
    augment.add_argument("--val-crop-size", type=int, default=None,
                         help="default: the --resume checkpoint's, else 224")
    augment.add_argument("--auto-augment", choices=("imagenet", "ta_wide", "randaugment"), default=None,
                         help="augmentation policy after crop and flip: AutoAugment's ImageNet policy, "
                              "TrivialAugmentWide or RandAugment (default: none)")
    augment.add_argument("--mixup-alpha", type=float, default=0.0, help="MixUp's Beta(alpha, alpha); 0 turns it off")
    augment.add_argument("--cutmix-alpha", type=float, default=0.0, help="CutMix's Beta(alpha, alpha); 0 turns it off")

    transfer = parser.add_argument_group("transfer and fine-tuning")
    transfer.add_argument("--init-from", default="", metavar="PATH", help="start a new run from the matching tensors "
                          "of any checkpoint or state_dict (torchvision ResNet, released ECA, ours)")
    transfer.add_argument("--freeze-backbone", action="store_true", help="train only the classifier (linear probe)")
    transfer.add_argument("--backbone-lr-scale", type=float, default=1.0, help="lr factor for all but the classifier")

    parser.set_defaults(**{key: value for key, value in defaults.items() if key != "arch"})
    return parser


def _read_config(path: str, known: Iterable[str]) -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise UsageError(f"--config {path!r} does not exist")
    try:
        with open(path) as handle:
            values = yaml.safe_load(handle)
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise UsageError(f"--config {path!r} is not valid YAML{line}: fix the syntax") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise UsageError(f"--config {path!r} must be a mapping of option: value")
    values = {str(key).replace("-", "_"): value for key, value in values.items()}
    unknown = sorted(set(values) - set(known) - {"config"})
    if unknown:
        raise UsageError(f"--config {path!r} has unknown keys {unknown}: use the long flag names, e.g. 'lr', 'arch', 'ksize'")
    return values


def parse_args(recipe: str, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse ``argv`` over the recipe and ``--config`` defaults, and check what can be checked early."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(recipe)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    config_path = pre.parse_known_args(argv)[0].config
    if config_path:
        known = {action.dest for action in parser._actions}
        config = _read_config(config_path, known)
        if "ksize" in config and config["ksize"] is not None:
            config["ksize"] = str(config["ksize"])
        if config.get("arch") is not None and config["arch"] not in ARCH_NAMES:
            raise UsageError(f"--config {config_path!r}: unknown arch {config['arch']!r}; choose from {ARCH_NAMES}")
        parser.set_defaults(**config)
    args = parser.parse_args(argv)
    args.recipe = recipe
    if args.arch is None and args.resume in ("", RESUME_AUTO):
        args.arch = RECIPES[recipe]["arch"]  # with --resume auto, the output folder's name needs it
    validate(args)
    return args


def validate(args: argparse.Namespace) -> None:
    """Errors that need no data, no device and no file: one line each, before anything starts."""
    if args.ksize is not None and args.arch is not None:
        check_ksize_applies(args.arch, args.ksize)
        try:
            parse_kernel_sizes(args.ksize, count=kernel_count(args.arch))
        except ValueError as error:
            raise UsageError(f"--ksize: {error}") from None
    if args.pretrained and not args.init_from and not args.resume:
        raise UsageError(
            "--pretrained: this codebase downloads nothing; download the released file "
            "(e.g. eca_resnet50_k3557.pth.tar) and pass --init-from FILE to fine-tune or -e --resume FILE to evaluate"
        )
    if args.resume and args.init_from:
        raise UsageError("--resume continues a run and --init-from starts a new one: pass only one of them")
    if args.resume and args.overwrite:
        raise UsageError("--resume continues a run and --overwrite replaces it with a new one: pass only one of them")
    if args.evaluate and args.resume == RESUME_AUTO:
        raise UsageError("-e --resume auto: name the checkpoint to evaluate, e.g. --resume runs/NAME/model_best.pth.tar")
    if args.save_every_steps is not None and args.save_every_steps < 1:
        raise UsageError("--save-every-steps must be a positive integer")
    if args.save_every_minutes is not None and args.save_every_minutes <= 0:
        raise UsageError("--save-every-minutes must be positive")
    for name in ("epochs", "batch_size", "print_freq"):
        if getattr(args, name) is None:
            raise UsageError(f"{flag_name(name)} must be a positive integer")
    require_at_least(args, 1, "epochs", "batch_size", "print_freq")
    if args.workers is not None and args.workers < 0:
        raise UsageError("-j/--workers must be 0 or more")
    if args.lr is None or args.lr <= 0:
        raise UsageError("--lr must be positive")
    for name in IMAGE_SIZES:
        if getattr(args, name) is not None and getattr(args, name) < 8:
            raise UsageError(f"{flag_name(name)} must be at least 8 pixels")
    if args.num_classes is not None and args.num_classes < 1:
        raise UsageError("--num-classes must be positive")
    if not 0.0 <= args.label_smoothing < 1.0:
        raise UsageError("--label-smoothing must be in [0, 1)")
    if args.mixup_alpha < 0 or args.cutmix_alpha < 0:
        raise UsageError("--mixup-alpha and --cutmix-alpha must be 0 (off) or positive")
    require_at_least(args, 0, "momentum", "weight_decay", "warmup_epochs", "backbone_lr_scale")
    for name in ("lr_gamma", "dist_timeout"):
        if getattr(args, name) <= 0:
            raise UsageError(f"{flag_name(name)} must be positive")
    require_at_least(args, 1, "lr_step_size", "model_ema_steps")
    if args.start_epoch is not None and args.start_epoch < 0:
        raise UsageError("--start-epoch must be 0 or more")
    if not 0.0 <= args.model_ema_decay <= 1.0:
        raise UsageError("--model-ema-decay must be in [0, 1]")
    if args.clip_grad_norm is not None and args.clip_grad_norm <= 0:
        raise UsageError("--clip-grad-norm must be positive (leave it out to not clip)")
    if args.gpu is not None and args.device not in (None, "cuda", f"cuda:{args.gpu}"):
        raise UsageError(f"--gpu {args.gpu} and --device {args.device} disagree: pass one of them")


IMAGE_SIZES = ("train_crop_size", "val_resize_size", "val_crop_size")
RESUME_AUTO = "auto"  # --resume auto: the output folder's checkpoint when there is one


class Config(argparse.Namespace):
    """A run's resolved arguments, read-only: every stage of the run sees what the set-up decided, and no more."""

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"the run's configuration is frozen once resolved: {name} cannot change")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"the run's configuration is frozen once resolved: {name} cannot go")


def resolve_config(args: argparse.Namespace, ckpt: Optional[Checkpoint], dist_url: Optional[str] = None) -> Config:
    """Fill in what the flags left open, from the ``--resume`` file where it says, and freeze the result.

    The architecture and image sizes a checkpoint's run used are its defaults,
    so ``-e --resume`` evaluates a model as it was validated during training and
    a resumed run goes on as it started. ``dist_url`` is where spawned processes meet.
    """
    contents = ckpt.contents if ckpt is not None else {}
    resolved = dict(vars(args))
    if resolved["arch"] is None:
        # parse_args defaults it but with --resume: then the file's tensors (and arch field) say.
        resolved["arch"] = architecture_of(ckpt)
    resolved["val_resize_size"], resolved["val_crop_size"] = evaluation_sizes(
        args.val_resize_size, args.val_crop_size, contents, flags=("--val-resize-size", "--val-crop-size")
    )
    if resolved["train_crop_size"] is None:
        resolved["train_crop_size"] = saved_size(contents, "train_crop_size") or DEFAULT_CROP_SIZE
    resolved["output_dir"] = args.output_dir or default_output_dir(resolved["arch"], args.action)
    if dist_url is not None:
        resolved["dist_url"] = dist_url
    config = Config.__new__(Config)
    config.__dict__.update(resolved)
    return config


def default_output_dir(arch: str, action: str) -> str:
    """The original's ``runs/<arch>_<action>`` (just ``runs/<arch>`` without an action tag)."""
    return os.path.join("runs", f"{arch}_{action}" if action else arch)


def serialisable_args(args: argparse.Namespace) -> Dict[str, Any]:
    """The arguments as plain data, for checkpoints (loadable with weights_only) and args.yaml."""
    plain: Dict[str, Any] = {}
    for key, value in vars(args).items():
        if value is None or isinstance(value, (bool, int, float, str)):
            plain[key] = value
        elif isinstance(value, (list, tuple)):
            plain[key] = list(value)
        else:
            plain[key] = str(value)
    return plain


def dump_yaml(values: Dict[str, Any]) -> str:
    return yaml.safe_dump(values, sort_keys=True)


def kernel_count(arch: str) -> int:
    """How many kernel sizes ``--ksize`` gives: one per ResNet stage, one per MobileNetV2 block."""
    return MOBILENET_BLOCKS if arch == "eca_mobilenet_v2" else 4


__all__ = ["RECIPES", "ARCH_NAMES", "Config", "build_parser", "parse_args", "resolve_config", "default_output_dir",
           "serialisable_args"]
