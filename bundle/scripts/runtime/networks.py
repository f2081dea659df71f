"""Networks of TC-MGAN that MONAI does not ship.

- :class:`Pix2PixUNet`: the pix2pix ``unet_128`` generator (7 stride-2 convolutions down to 1x1, skips,
  InstanceNorm, Tanh), the generator of the paper and of the reference code.
- :class:`SynthesisNet`: the T2 -> (FLAIR, T1, T1ce) synthesiser used for training *and* inference. For the
  conditional variants (MGAN, TC-MGAN, TC-MGAN bw) it holds one generator fed with the T2 slice plus the
  one-hot target label as constant planes; for ``pix2pix`` it holds one unconditional generator per target.
  ``forward(x)`` maps ``(B, 1, H, W)`` to ``(B, 3, H, W)`` so that the model-zoo tools (``verify_net_in_out``,
  ``ckpt_export``) and the 3D inference chain need a single input.
- :class:`ModalityCritic`: the StarGAN-style WGAN critic D(x, y) with a source head and a
  modality-classification head; :class:`PerTargetCritics` holds one plain critic per target for pix2pix.
- :class:`TumourSegmenter`: S(y, c), a MONAI ``UNet`` on a target slice plus the label planes, giving
  whole-tumour logits.
- :class:`AnyMissingNet`: the ``anymissing`` generator (not one of the paper's variants): any available subset of
  the four modalities -> any missing one, steered by an availability mask and the target label
  (:func:`any_missing_input` builds its input, in training and inference alike).

Target label order is declared once, in :data:`scripts.runtime.conventions.TARGETS`.
Every module keeps its architecture in a persistent ``arch`` buffer, so a checkpoint says what it holds.
"""

from __future__ import annotations

import math
from typing import List, Optional

import torch
from monai.networks.nets import UNet
from torch import nn

# target modalities (index k of the one-hot label selects TARGETS[k]) and the paper's variants, declared once
from .conventions import ANYMISSING, CHANNELS, GENERATORS, SOURCE, TARGETS, VARIANTS  # noqa: F401 (re-exported)

#: How a T2 volume is scaled to [-1, 1] (``scripts.runtime.data.ScaleBrainIntensityd`` modes).
INTENSITY_SCALINGS = ("volume", "slice")


#: How the generator's decoder doubles the resolution: the paper's 4x4 stride-2 transposed convolution, or a
#: bilinear resize followed by a 3x3 convolution (no checkerboard by construction; the recommended model).
UPSAMPLINGS = ("transpose", "resize")

#: Version of the ``_extra_state`` layout written by :func:`encode_description` (1: without ``upsample``).
DESCRIPTION_VERSION = 2


def encode_description(description: dict) -> torch.Tensor:
    """A generator description ``{"image_size", "intensity_scaling", "in_channels", "upsample", "targets"}`` as the
    int64 tensor ``[version, image_size, index in INTENSITY_SCALINGS, in_channels, index in UPSAMPLINGS,
    len(targets), *indices in CHANNELS]``.

    Raises:
        ValueError: an unknown intensity scaling, upsampling or target.
    """
    scaling, targets = description["intensity_scaling"], list(description["targets"])
    upsample = description.get("upsample", "transpose")
    if scaling not in INTENSITY_SCALINGS:
        raise ValueError(f"unknown intensity_scaling {scaling!r}; expected one of {INTENSITY_SCALINGS}")
    if upsample not in UPSAMPLINGS:
        raise ValueError(f"unknown upsample {upsample!r}; expected one of {UPSAMPLINGS}")
    unknown = [t for t in targets if t not in CHANNELS]
    if unknown:
        raise ValueError(f"unknown targets {unknown}; expected some of {CHANNELS}")
    values = [DESCRIPTION_VERSION, int(description["image_size"]), INTENSITY_SCALINGS.index(scaling)]
    values += [int(description["in_channels"]), UPSAMPLINGS.index(upsample)]
    values += [len(targets), *[CHANNELS.index(t) for t in targets]]
    return torch.tensor(values, dtype=torch.int64)


def decode_description(state) -> dict:
    """The inverse of :func:`encode_description`; a version-1 description (before ``upsample``) reads as
    ``"transpose"``.

    Raises:
        ValueError: ``state`` is not such a tensor (another layout, version or length).
    """
    values = state.tolist() if isinstance(state, torch.Tensor) and state.ndim == 1 else None
    if values and values[0] == 1 and len(values) >= 5:  # version 1: no upsample entry
        values = [2, *values[1:4], 0, *values[4:]]
    if not values or values[0] != DESCRIPTION_VERSION or len(values) < 6 or len(values) != 6 + values[5]:
        raise ValueError(f"{state!r} is not a brainsynth generator description (version {DESCRIPTION_VERSION})")
    if (not 0 <= values[2] < len(INTENSITY_SCALINGS) or not 0 <= values[4] < len(UPSAMPLINGS)
            or not all(0 <= i < len(CHANNELS) for i in values[6:])):
        raise ValueError(f"{state!r} is not a brainsynth generator description (an index out of range)")
    return {
        "image_size": values[1],
        "intensity_scaling": INTENSITY_SCALINGS[values[2]],
        "in_channels": values[3],
        "upsample": UPSAMPLINGS[values[4]],
        "targets": [CHANNELS[i] for i in values[6:]],
    }


def label_planes(labels: torch.Tensor, num_labels: int, like: torch.Tensor) -> torch.Tensor:
    """One-hot labels as constant planes.

    Args:
        labels: ``(B,)`` integer target indices in ``[0, num_labels)``.
        num_labels: number of targets.
        like: ``(B, C, H, W)`` tensor giving the spatial size, dtype and device.

    Returns:
        ``(B, num_labels, H, W)`` tensor of zeros and ones.
    """
    onehot = nn.functional.one_hot(labels.long(), num_labels).to(like.dtype)
    return onehot[:, :, None, None].expand(-1, -1, like.shape[-2], like.shape[-1])


class Pix2PixUNet(nn.Module):
    """pix2pix U-Net generator (``unet_128`` when ``num_downs=7``).

    Encoder: ``num_downs`` convolutions (kernel 4, stride 2) with widths ``features * (1, 2, 4, 8, 8, ...)``;
    LeakyReLU(0.2) before every convolution but the first, InstanceNorm after every one but the first and the
    innermost. Decoder: ReLU, transposed convolution (kernel 4, stride 2), InstanceNorm, concatenated with the
    encoder feature of the same size; the last layer ends in Tanh. No dropout.

    Input ``(B, in_channels, H, W)`` with H and W divisible by ``2**num_downs``; output
    ``(B, out_channels, H, W)`` in ``[-1, 1]``.

    ``upsample="resize"`` replaces each transposed convolution by a bilinear 2x resize and a 3x3 convolution
    (same widths), which cannot produce the checkerboard texture of strided transposed convolutions.
    """

    def __init__(self, in_channels: int, out_channels: int = 1, features: int = 64, num_downs: int = 7,
                 upsample: str = "transpose"):
        super().__init__()
        if upsample not in UPSAMPLINGS:
            raise ValueError(f"unknown upsample {upsample!r}; expected one of {UPSAMPLINGS}")

        def up(c_in: int, c_out: int) -> list[nn.Module]:
            if upsample == "transpose":
                return [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1)]
            return [nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False), nn.Conv2d(c_in, c_out, 3, 1, 1)]

        widths = [features * min(2**i, 8) for i in range(num_downs)]
        self.down = nn.ModuleList()
        for i, width in enumerate(widths):
            layers: list[nn.Module] = [] if i == 0 else [nn.LeakyReLU(0.2)]
            layers.append(nn.Conv2d(in_channels if i == 0 else widths[i - 1], width, 4, 2, 1))
            if 0 < i < num_downs - 1:
                layers.append(nn.InstanceNorm2d(width))
            self.down.append(nn.Sequential(*layers))
        self.up = nn.ModuleList()
        for i in range(num_downs - 1, 0, -1):  # innermost first; each output is concatenated with down[i - 1]
            in_width = widths[i] if i == num_downs - 1 else 2 * widths[i]
            self.up.append(nn.Sequential(nn.ReLU(), *up(in_width, widths[i - 1]), nn.InstanceNorm2d(widths[i - 1])))
        self.out = nn.Sequential(nn.ReLU(), *up(2 * widths[0], out_channels), nn.Tanh())
        for m in self.modules():  # pix2pix init: N(0, 0.02) weights, zero biases
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.normal_(m.weight, 0.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips: list[torch.Tensor] = []
        for layer in self.down:
            x = layer(x)
            skips.append(x)
        x = skips[-1]
        for i, layer in enumerate(self.up):
            x = torch.cat([layer(x), skips[-2 - i]], dim=1)
        return self.out(x)


#: Quantile levels (%) of the output calibration's knots (:class:`IntensityCalibration`).
CALIBRATION_QUANTILES = (0, 0.5, 1, 2, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 98, 99, 99.5, 100)


class IntensityCalibration(nn.Module):
    """A monotone piecewise-linear map of each target's output intensities, fitted after training
    (:func:`scripts.runtime.calibration.fit_calibration`); the identity until then.

    A generator trained with an L1 term is smooth: its brightest tissue stays below the real image's upper tail
    (noise, bias field), so once a volume is normalised by its own brain percentiles, as the quality protocol and
    most pipelines do, the synthesis's whole brain sits too bright. The map sends the synthesis's brain quantiles
    (averaged over fitting cases) to the real targets' (:data:`CALIBRATION_QUANTILES`), in the [-1, 1] training
    scale. It is written as a sum of ReLU hinges, so it exports to ONNX and TorchScript and keeps gradients.

    Buffers ``source`` and ``target``, ``(num_targets, K)``: the knots (``source`` strictly increasing per
    target). A state dict without them (a ``model.pt`` from before the calibration existed) loads as the identity.
    """

    def __init__(self, num_targets: int = 3, num_knots: int = len(CALIBRATION_QUANTILES)):
        super().__init__()
        knots = torch.linspace(-1.0, 1.0, int(num_knots)).repeat(int(num_targets), 1)
        self.register_buffer("source", knots.clone())
        self.register_buffer("target", knots.clone())

    @property
    def identity(self) -> bool:
        return bool(torch.equal(self.source, self.target))

    def set_knots(self, source: torch.Tensor, target: torch.Tensor) -> None:
        """Set the knots (``(num_targets, K)`` each); ``source`` must increase strictly along each row."""
        source, target = torch.as_tensor(source).float(), torch.as_tensor(target).float()
        if source.shape != self.source.shape or target.shape != self.target.shape:
            raise ValueError(f"knots of shape {tuple(self.source.shape)} expected, got {tuple(source.shape)}, "
                             f"{tuple(target.shape)}")
        if not bool((source.diff(dim=1) > 0).all()):
            raise ValueError("the calibration's source knots must increase strictly")
        self.source.copy_(source)
        self.target.copy_(target)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        identity = torch.linspace(-1.0, 1.0, self.source.shape[1]).repeat(self.source.shape[0], 1)
        for name in ("source", "target"):  # an older model.pt: the identity
            state_dict.setdefault(prefix + name, identity.to(self.source.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, y: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``y`` ``(B, 1, H, W)``, target ``labels`` ``(B,)`` -> the calibrated ``y``."""
        if self.identity:
            return y
        x, t = self.source[labels], self.target[labels]  # (B, K), fp32 (also under bf16 autocast)
        slopes = (t[:, 1:] - t[:, :-1]) / (x[:, 1:] - x[:, :-1])  # (B, K - 1); no diff: ONNX has none
        x = x[:, :, None, None]
        v = torch.minimum(torch.maximum(y.float(), x[:, :1]), x[:, -1:])  # clamped to the knots' range
        out = t[:, :1, None, None] + slopes[:, :1, None, None] * (v - x[:, :1])
        bends = (slopes[:, 1:] - slopes[:, :-1])[:, :, None, None]
        return (out + (bends * torch.relu(v - x[:, 1:-1])).sum(dim=1, keepdim=True)).to(y.dtype)


class SynthesisNet(nn.Module):
    """T2 slice(s) -> synthesised target slices; the generator of every variant, and a self-describing checkpoint.

    Args:
        variant: one of :data:`VARIANTS`. ``pix2pix`` keeps one unconditional generator per target; the others
            keep one generator conditioned on the one-hot target label.
        features: base width of the generator(s) (64 in the paper).
        num_targets: number of targets (3: FLAIR, T1, T1ce, in :data:`TARGETS` order).
        num_downs: depth of the U-Net (7 for 128x128 slices).
        image_size: side of the square slices the network was trained on (the workflows resize to it).
        intensity_scaling: how the T2 was scaled to [-1, 1] in training, ``"volume"`` or ``"slice"`` (see
            ``scripts.runtime.data.ScaleBrainIntensityd``).
        in_channels: T2 slices per input (1; an odd k > 1 for through-plane context: the slice and its neighbours).
        upsample: ``"transpose"`` (the paper's transposed convolutions) or ``"resize"`` (see :class:`Pix2PixUNet`).

    ``state_dict()`` carries, besides the weights and the ``arch`` buffer, an ``_extra_state`` entry, the encoded
    :meth:`description` ``{"image_size", "intensity_scaling", "in_channels", "targets"}``, so a ``model.pt``
    says how to prepare its input; :func:`scripts.runtime.checkpoints.read_model` reads it back.

    Raises:
        ValueError: unknown variant or intensity scaling, or sizes < 1.
    """

    def __init__(
        self,
        variant: str = "tcmgan",
        features: int = 64,
        num_targets: int = 3,
        num_downs: int = 7,
        image_size: int = 128,
        intensity_scaling: str = "volume",
        in_channels: int = 1,
        upsample: str = "transpose",
    ):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
        if intensity_scaling not in INTENSITY_SCALINGS:
            raise ValueError(f"unknown intensity_scaling {intensity_scaling!r}; expected one of {INTENSITY_SCALINGS}")
        if min(int(features), int(num_targets), int(image_size), int(in_channels)) < 1:
            raise ValueError("features, num_targets, image_size and in_channels must be >= 1")
        self.variant = variant
        self.num_targets = int(num_targets)
        self.image_size = int(image_size)
        self.intensity_scaling = intensity_scaling
        self.in_channels = int(in_channels)
        self.upsample = upsample
        self.conditional = variant != "pix2pix"
        n_gen = 1 if self.conditional else num_targets
        in_ch = self.in_channels + num_targets if self.conditional else self.in_channels
        self.generators = nn.ModuleList([Pix2PixUNet(in_ch, 1, features, num_downs, upsample) for _ in range(n_gen)])
        self.calibration = IntensityCalibration(self.num_targets)
        self.register_buffer("arch", torch.tensor([VARIANTS.index(variant), features, num_targets, num_downs]))

    def settings(self) -> dict:
        """Everything it was built with, as :func:`scripts.runtime.checkpoints.read_model` reads it from a file."""
        return {"variant": self.variant, "features": int(self.arch[1]), "num_targets": self.num_targets,
                "num_downs": int(self.arch[3]), **self.description()}  # fmt: skip

    def description(self) -> dict:
        """What a user of the weights must know besides the architecture: ``image_size``, ``intensity_scaling``,
        ``in_channels``, ``targets`` (saved in ``state_dict()`` as ``_extra_state``, :func:`encode_description`)."""
        return {
            "image_size": self.image_size,
            "intensity_scaling": self.intensity_scaling,
            "in_channels": self.in_channels,
            "upsample": self.upsample,
            "targets": list(TARGETS[: self.num_targets]),
        }

    def get_extra_state(self) -> torch.Tensor:
        """:meth:`description` as an integer tensor (:func:`encode_description`): a tensor, not a dict, so that
        every tool that walks a state dict (ONNX export, TorchScript, DDP, the zoo's ``ckpt_export``) accepts it."""
        return encode_description(self.description())

    def set_extra_state(self, state) -> None:
        """Called by ``load_state_dict``: weights made for other input preparation are refused.

        Raises:
            ValueError: the checkpoint's image size, intensity scaling, input channels or targets differ from
                this network's (the message names each), or ``state`` is not an encoded description.
        """
        found = decode_description(state)
        wrong = [f"{k} {found[k]!r} (this network: {v!r})" for k, v in self.description().items() if found[k] != v]
        if wrong:
            raise ValueError("the weights were made for " + ", ".join(wrong))

    def synthesise(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """G(x, c): ``x`` ``(B, in_channels, H, W)`` T2 in [-1, 1], ``labels`` ``(B,)`` target indices
        -> ``(B, 1, H, W)``."""
        if self.conditional:
            out = self.generators[0](torch.cat([x, label_planes(labels, self.num_targets, x)], dim=1))
            return self.calibration(out, labels)
        out = x.new_zeros(x.shape[0], 1, x.shape[-2], x.shape[-1])
        for k, gen in enumerate(self.generators):  # route each sample to the generator of its target
            idx = (labels == k).nonzero().flatten()
            if idx.numel() > 0:
                out = out.index_put((idx,), gen(x.index_select(0, idx)))
        return self.calibration(out, labels)

    #: the modalities it reads (:data:`SOURCE` alone: the paper's task)
    inputs = (SOURCE,)
    __jit_unused_properties__ = ["outputs"]  # TorchScript (the zoo's ckpt_export) compiles forward without it

    @classmethod
    def from_settings(cls, variant: str = "tcmgan", features: int = 64, num_downs: int = 7, image_size: int = 128,
                      intensity_scaling: str = "volume", in_channels: int = 1, upsample: str = "transpose",
                      num_targets: int = 3, **_) -> SynthesisNet:
        """Built from the settings every generator kind shares (:func:`make_generator`, the checkpoints)."""
        return cls(variant, features, num_targets, num_downs, image_size, intensity_scaling, in_channels, upsample)

    @property
    def outputs(self) -> tuple[str, ...]:
        """The modalities it writes, in channel order (:data:`TARGETS`)."""
        return tuple(TARGETS[: self.num_targets])

    def forward(self, x: torch.Tensor, labels: Optional[torch.Tensor] = None,
                available: Optional[torch.Tensor] = None, outputs: Optional[List[str]] = None) -> torch.Tensor:
        """The targets ``outputs`` (names or indices in :attr:`outputs`; default all) at once: ``(B, in_channels,
        H, W)`` T2 -> ``(B, len(outputs), H, W)`` in the order asked. ``available`` (the case's
        modalities, as the any-missing generator takes them) is accepted for one calling form: this generator
        reads the T2 alone.

        With ``labels`` ``(B,)``, one target per sample instead: ``(B, 1, H, W)``, as :meth:`synthesise` (the
        trainer calls this form, so that a ``DistributedDataParallel`` wrapper sees the forward pass).
        """
        if labels is not None:
            return self.synthesise(x, labels)
        wanted = list(range(self.num_targets)) if outputs is None else self._wanted(outputs)
        b = x.shape[0]
        if self.conditional:  # one batched forward over (target, sample) pairs
            labels = torch.tensor(wanted, dtype=torch.long, device=x.device).repeat_interleave(b)
            out = self.synthesise(x.repeat(len(wanted), 1, 1, 1), labels)
            return out.reshape(len(wanted), b, x.shape[-2], x.shape[-1]).transpose(0, 1)
        outs: List[torch.Tensor] = []
        for k in wanted:  # TorchScript indexes a ModuleList by constants only: find generator k by walking them
            for j, gen in enumerate(self.generators):
                if j == k:
                    outs.append(gen(x))
        return torch.cat(outs, dim=1)

    @torch.jit.unused
    def _wanted(self, outputs):
        # type: (List[str]) -> List[int]
        """The channels ``outputs`` asks for (names or indices, :func:`output_indices`; Python only: TorchScript
        keeps the all-targets path; a type comment, as the module's annotations are strings)."""
        return output_indices(outputs, self.outputs)


def output_indices(outputs, names) -> list[int]:
    """The channels of ``names`` (a generator's :attr:`outputs`) that ``outputs`` asks for: None (all), indices, or
    names (a list, or one comma-separated string such as a case's ``missing``).

    Raises:
        ValueError: a name the generator does not write, or an index out of range.
    """
    if outputs is None:
        return list(range(len(names)))
    if isinstance(outputs, str):
        outputs = [o for o in outputs.split(",") if o]
    if isinstance(outputs, torch.Tensor):
        outputs = outputs.flatten().tolist()
    wanted = []
    for o in outputs:
        if isinstance(o, str):
            if o not in names:
                raise ValueError(f"this generator writes {', '.join(names)}; it cannot synthesise {o!r}")
            wanted.append(names.index(o))
        elif 0 <= int(o) < len(names):
            wanted.append(int(o))
        else:
            raise ValueError(f"output index {o} out of range for a generator of {len(names)} outputs")
    return wanted


class ModalityCritic(nn.Module):
    """StarGAN-style critic on (source, target) pairs.

    ``repeat_num`` convolutions (kernel 4, stride 2, LeakyReLU 0.01, no normalisation) with widths
    ``features * 2**i``; a source head (3x3 convolution to one channel: a WGAN critic map) and, when
    ``num_classes > 0``, a classification head (a convolution spanning the whole final map) giving
    target-modality logits.

    ``forward(source, target, labels=None)``: ``source`` (T2; ``(B, source_channels, H, W)``, the any-missing
    generator's :func:`any_missing_input`) and ``target`` (real or synthesised, ``(B, 1, H, W)``); returns
    ``(src (B, 1, h, w), cls (B, num_classes) or None)``. ``labels`` is ignored (it exists so that
    :class:`PerTargetCritics` shares the signature).
    """

    def __init__(self, features: int = 64, num_classes: int = 3, image_size: int = 128, repeat_num: int = 5,
                 source_channels: int = 1):
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 1 + int(source_channels)
        for i in range(repeat_num):
            layers += [nn.Conv2d(in_ch, features * 2**i, 4, 2, 1), nn.LeakyReLU(0.01)]
            in_ch = features * 2**i
        self.trunk = nn.Sequential(*layers)
        self.src = nn.Conv2d(in_ch, 1, 3, 1, 1, bias=False)
        self.cls = nn.Conv2d(in_ch, num_classes, image_size // 2**repeat_num, bias=False) if num_classes else None
        self.register_buffer("arch", torch.tensor([features, num_classes, image_size, repeat_num]))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, source: torch.Tensor, target: torch.Tensor, labels: torch.Tensor | None = None):
        h = self.trunk(torch.cat([target, source], dim=1))
        cls = self.cls(h).flatten(1) if self.cls is not None else None
        return self.src(h), cls


class PerTargetCritics(nn.Module):
    """pix2pix baseline: one plain critic (no classification head) per target, routed by ``labels``."""

    def __init__(self, features: int = 64, num_targets: int = 3, image_size: int = 128, repeat_num: int = 5):
        super().__init__()
        self.critics = nn.ModuleList(
            [ModalityCritic(features, 0, image_size, repeat_num) for _ in range(num_targets)]
        )

    def forward(self, source: torch.Tensor, target: torch.Tensor, labels: torch.Tensor | None = None):
        if labels is None:
            raise ValueError("PerTargetCritics needs the target labels to route each sample")
        src = None
        for k, critic in enumerate(self.critics):
            idx = (labels == k).nonzero().flatten()
            if idx.numel() == 0:
                continue
            out, _ = critic(source.index_select(0, idx), target.index_select(0, idx))
            src = out.new_zeros((source.shape[0], *out.shape[1:])) if src is None else src
            src = src.index_put((idx,), out)
        return src, None


def make_critic(variant: str, features: int = 64, num_targets: int = 3, image_size: int = 128) -> nn.Module:
    """The critic of a variant: per-target plain critics for pix2pix, one two-head critic otherwise (for
    ``anymissing``: four modality classes, conditioned on :func:`any_missing_input` of the centre slices)."""
    if variant not in GENERATORS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {GENERATORS}")
    if variant == "pix2pix":
        return PerTargetCritics(features, num_targets, image_size)
    if variant == ANYMISSING:
        return ModalityCritic(features, len(CHANNELS), image_size, source_channels=2 * len(CHANNELS))
    return ModalityCritic(features, num_targets, image_size)


def make_generator(variant: str = "tcmgan", features: int = 64, image_size: int = 128,
                   intensity_scaling: str = "volume", in_channels: int = 1, upsample: str = "transpose",
                   num_downs: int = 7) -> nn.Module:
    """The generator of ``variant``, built by its class in :data:`GENERATOR_CLASSES` (``from_settings``):
    a :class:`SynthesisNet` for the paper's four, an :class:`AnyMissingNet` (``in_channels`` slices of context per
    modality) for ``anymissing``.

    Raises:
        ValueError: unknown variant, or invalid settings (as the classes).
    """
    if variant not in GENERATOR_CLASSES:
        raise ValueError(f"unknown variant {variant!r}; expected one of {GENERATORS}")
    return GENERATOR_CLASSES[variant].from_settings(
        variant=variant, features=features, num_downs=num_downs, image_size=image_size,
        intensity_scaling=intensity_scaling, in_channels=in_channels, upsample=upsample,
    )  # fmt: skip


class TumourSegmenter(nn.Module):
    """S(y, c): whole-tumour segmenter on a (real or synthesised) target slice conditioned on its modality.

    A MONAI :class:`~monai.networks.nets.UNet` (2D, widths ``features * (1, 2, 4, 8, 16)``, BatchNorm,
    2 residual units per level) on ``[y, label planes]``.

    ``forward(y, labels)``: ``y`` ``(B, 1, H, W)`` in [-1, 1], ``labels`` ``(B,)`` -> ``(B, 1, H, W)`` logits.
    """

    def __init__(self, features: int = 16, num_targets: int = 3):
        super().__init__()
        self.num_targets = num_targets
        self.unet = UNet(
            spatial_dims=2,
            in_channels=1 + num_targets,
            out_channels=1,
            channels=tuple(features * 2**i for i in range(5)),
            strides=(2, 2, 2, 2),
            num_res_units=2,
            norm="batch",
        )
        # start from "no tumour almost everywhere" (p = 0.01): tumours cover ~1 % of a slice, and from p = 0.5
        # the Dice gradient over 16k pixels is tiny, so pre-training would spend thousands of steps getting there
        last = [m for m in self.unet.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))][-1]
        nn.init.constant_(last.bias, math.log(0.01 / 0.99))
        self.register_buffer("arch", torch.tensor([features, num_targets]))

    def forward(self, y: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.unet(torch.cat([y, label_planes(labels, self.num_targets, y)], dim=1))


class SingleTargetSynthesisNet(SynthesisNet):
    """A :class:`SynthesisNet` that synthesises one fixed target.

    ``forward(x)``: ``(B, 1, H, W)`` T2 slices in [-1, 1] -> ``(B, 1, H, W)`` slices of ``target`` in [-1, 1].
    It has exactly SynthesisNet's parameters, buffers and state-dict keys, so the bundle's ``model.pt`` loads
    into it unchanged (MONAI Label loads with ``strict=False``, which would silently skip mismatched keys).

    Args:
        variant, features, num_targets, num_downs, image_size, intensity_scaling, in_channels, upsample: as
            :class:`SynthesisNet` (they must match the checkpoint).
        target: one of :data:`TARGETS` (case-insensitive).

    Raises:
        ValueError: unknown target.
    """

    def __init__(
        self,
        variant: str = "tcmgan",
        features: int = 64,
        target: str = "flair",
        num_targets: int = 3,
        num_downs: int = 7,
        image_size: int = 128,
        intensity_scaling: str = "volume",
        in_channels: int = 1,
        upsample: str = "transpose",
    ):
        super().__init__(variant, features, num_targets, num_downs, image_size, intensity_scaling, in_channels,
                         upsample)
        if str(target).lower() not in TARGETS:
            raise ValueError(f"unknown target {target!r}; expected one of {TARGETS}")
        self.target = str(target).lower()
        self.target_index = TARGETS.index(self.target)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if labels is None:
            labels = torch.full((x.shape[0],), self.target_index, dtype=torch.long, device=x.device)
        return self.synthesise(x, labels)


#: The value a missing modality's slot holds: raw intensity 0, i.e. background after scaling to [-1, 1].
MISSING_FILL = -1.0


def t2_only(batch: int, device=None) -> torch.Tensor:
    """The paper's scenario as an availability mask: ``(batch, 4)`` with only T2 present (:data:`CHANNELS` order)."""
    available = torch.zeros(batch, len(CHANNELS), dtype=torch.bool, device=device)
    available[:, CHANNELS.index(SOURCE)] = True
    return available


def any_missing_input(x: torch.Tensor, available: torch.Tensor, context: int = 1) -> torch.Tensor:
    """The any-missing generator's input, built the same way in training, validation and inference.

    Args:
        x: ``(N, 4 * context, H, W)`` modality slots in :data:`CHANNELS` order (FLAIR, T1, T1ce, T2), each modality's
            ``context`` neighbouring slices together; in [-1, 1]. What a missing slot holds does not matter.
        available: ``(N, 4)`` or ``(1, 4)`` availability (bool or 0/1), :data:`CHANNELS` order.
        context: slices per modality.

    Returns:
        ``(N, 4 * context + 4, H, W)``: the slots with every missing modality filled with :data:`MISSING_FILL`
        (raw 0, as if zero-filled before scaling), then one constant plane per modality, 1 if available, else 0.
    """
    m = len(CHANNELS)
    if x.shape[1] != m * context:
        raise ValueError(f"expected {m * context} slot channels ({m} modalities x {context} slices), got {x.shape[1]}")
    avail = available.to(device=x.device, dtype=x.dtype).reshape(-1, m).expand(x.shape[0], m)
    keep = avail.repeat_interleave(int(context), dim=1)[:, :, None, None]
    slots = x * keep + MISSING_FILL * (1 - keep)
    planes = avail[:, :, None, None].expand(-1, -1, x.shape[-2], x.shape[-1])
    return torch.cat([slots, planes], dim=1)


class AnyMissingNet(nn.Module):
    """Any available modalities -> a missing one: G(slots, availability, c), the ``anymissing`` generator.

    One :class:`Pix2PixUNet` reads :func:`any_missing_input` (the four modality slots, a missing one filled with
    background, and the availability planes) plus the one-hot label of the modality to synthesise (TC-MGAN's label
    planes, over four modalities). The target's own slot is always treated as missing, so the network never sees
    what it is asked to produce.

    Args:
        features: base width. num_downs: U-Net depth (7 for 128x128). image_size, intensity_scaling, upsample: as
            :class:`SynthesisNet`. context: slices per modality (1, or an odd k for 2.5D context).

    ``forward(x, available=None, labels=None, outputs=None)``: ``x`` ``(N, 4 * context, H, W)`` slots,
    ``available`` ``(N or 1, 4)`` (None: T2 only, the paper's task, so that one-input tools such as the zoo's
    ``verify_net_in_out`` can call it). With ``labels`` ``(N,)`` (indices in :data:`CHANNELS`): one modality per
    sample, ``(N, 1, H, W)``; else the modalities ``outputs`` (names or indices, :func:`output_indices`; default all
    four) ``(N, len, H, W)``.
    The state dict's ``arch`` buffer is ``[features, num_downs, image_size, scaling index, context, upsample
    index]`` and its weights sit under ``generator.`` (a paper generator's under ``generators.``).
    """

    variant = ANYMISSING
    #: the modalities it reads (any subset, given by ``available``) and writes, in channel order
    inputs = outputs = tuple(CHANNELS)

    @classmethod
    def from_settings(cls, features: int = 64, num_downs: int = 7, image_size: int = 128,
                      intensity_scaling: str = "volume", in_channels: int = 1, upsample: str = "transpose",
                      **_) -> AnyMissingNet:
        """Built from the settings every generator kind shares (``in_channels``: its ``context``)."""
        return cls(features, num_downs, image_size, intensity_scaling, context=in_channels, upsample=upsample)

    def __init__(self, features: int = 64, num_downs: int = 7, image_size: int = 128,
                 intensity_scaling: str = "volume", context: int = 1, upsample: str = "transpose"):
        super().__init__()
        if intensity_scaling not in INTENSITY_SCALINGS:
            raise ValueError(f"unknown intensity_scaling {intensity_scaling!r}; expected one of {INTENSITY_SCALINGS}")
        if upsample not in UPSAMPLINGS:
            raise ValueError(f"unknown upsample {upsample!r}; expected one of {UPSAMPLINGS}")
        if min(int(features), int(image_size), int(context)) < 1 or int(context) % 2 == 0:
            raise ValueError("features and image_size must be >= 1 and context an odd number >= 1")
        self.num_modalities = len(CHANNELS)
        self.context = int(context)
        self.image_size = int(image_size)
        self.intensity_scaling = intensity_scaling
        self.upsample = upsample
        m = self.num_modalities
        self.generator = Pix2PixUNet(m * self.context + 2 * m, 1, features, num_downs, upsample)
        self.register_buffer("arch", torch.tensor([
            features, num_downs, self.image_size, INTENSITY_SCALINGS.index(intensity_scaling), self.context,
            UPSAMPLINGS.index(upsample)]))  # fmt: skip

    def description(self) -> dict:
        """The settings the ``arch`` buffer records (``decode_any_missing_arch`` reads them back)."""
        return decode_any_missing_arch(self.arch)

    def settings(self) -> dict:
        """Everything it was built with, as :func:`scripts.runtime.checkpoints.read_model` reads it from a file
        (``in_channels``: its ``context``)."""
        return {**self.description(), "in_channels": self.context, "targets": list(self.outputs)}

    def synthesise(self, x: torch.Tensor, available: torch.Tensor | None, labels: torch.Tensor) -> torch.Tensor:
        """One modality per sample: ``(N, 1, H, W)``; the target's slot is masked whatever ``available`` says."""
        avail = t2_only(1, x.device) if available is None else available
        avail = avail.to(device=x.device, dtype=x.dtype).reshape(-1, self.num_modalities).expand(x.shape[0], -1)
        onehot = nn.functional.one_hot(labels.long(), self.num_modalities).to(x.dtype)
        g_in = any_missing_input(x, avail * (1 - onehot), self.context)
        return self.generator(torch.cat([g_in, label_planes(labels, self.num_modalities, x)], dim=1))

    def forward(self, x: torch.Tensor, available: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                outputs=None) -> torch.Tensor:
        if labels is not None:
            return self.synthesise(x, available, labels)
        wanted = output_indices(outputs, self.outputs)
        n = x.shape[0]
        labels = torch.tensor(wanted, device=x.device).repeat_interleave(n)
        avail = t2_only(1, x.device) if available is None else available
        avail = avail.to(x.device).reshape(-1, self.num_modalities).expand(n, -1).repeat(len(wanted), 1)
        out = self.synthesise(x.repeat(len(wanted), 1, 1, 1), avail, labels)
        return out.reshape(len(wanted), n, x.shape[-2], x.shape[-1]).transpose(0, 1)


def decode_any_missing_arch(arch) -> dict:
    """An :class:`AnyMissingNet` ``arch`` buffer as ``{"variant", "features", "num_downs", "image_size",
    "intensity_scaling", "context", "upsample"}``.

    Raises:
        ValueError: not such a buffer.
    """
    values = [int(v) for v in arch.tolist()] if isinstance(arch, torch.Tensor) else []
    if (len(values) != 6 or not 0 <= values[3] < len(INTENSITY_SCALINGS) or not 0 <= values[5] < len(UPSAMPLINGS)
            or min(values[:3]) < 1 or values[4] < 1):
        raise ValueError(f"{arch!r} is not an any-missing generator's arch entry")
    return {"variant": ANYMISSING, "features": values[0], "num_downs": values[1], "image_size": values[2],
            "intensity_scaling": INTENSITY_SCALINGS[values[3]], "context": values[4],
            "upsample": UPSAMPLINGS[values[5]]}


#: The generator class of each variant. A new kind of generator declares the modalities it reads and writes
#: (``inputs``, ``outputs``), builds itself from the shared settings (``from_settings``) and is registered here;
#: its checkpoint reader goes into :data:`scripts.runtime.checkpoints.GENERATOR_READERS`.
GENERATOR_CLASSES = {**dict.fromkeys(VARIANTS, SynthesisNet), ANYMISSING: AnyMissingNet}
