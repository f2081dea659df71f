"""The TC-MGAN GAN iteration as a MONAI ``Trainer``.

MONAI's ``GanTrainer`` feeds the generator random latents and ``AdversarialTrainer`` gives its losses only the
critic logits, so neither can express a conditional, paired generator with a WGAN-GP critic, an auxiliary
modality classifier and a tumour-consistency term. :class:`TCMGANTrainer` keeps GanTrainer's argument names
and replaces only the iteration; everything else (handlers, metrics, resume) is the standard MONAI/Ignite
workflow declared in ``configs/train.json``.

One iteration on a batch ``{"image": (B, 4, H, W) [FLAIR, T1, T1ce, T2] in [-1, 1], "label": (B, 1, H, W)}``:

1. draw a target index k ~ U{0, 1, 2} per sample; x = T2, y = target k, tumour = label > 0;
2. ``d_train_steps`` critic steps on :func:`~scripts.runtime.losses.critic_loss` (eq. 6):
   ``L_D = -D_src(x, y) + D_src(x, G(x, k)) + λcls·CE(D_cls(x, y), k) + λgp·GP``;
3. one generator step on :func:`~scripts.runtime.losses.generator_loss` (eq. 7), whose tumour-consistency
   term is :func:`~scripts.runtime.losses.tumour_consistency_loss` (eq. 4):
   ``L_G = -D_src(x, G(x, k)) + λcls·CE(D_cls(x, G), k) + λl1·L1(G, y) + λseg·Dice(S(G, k), tumour)``;
4. ``tcmgan_bw`` only (``train_segmenter=True``): one segmenter step on
   :func:`~scripts.runtime.losses.segmenter_update_loss`,
   ``0.7·Dice(S(G.detach(), k)) + 0.3·Dice(S(y, k))`` (the reference code's joint update).

S is frozen (eval mode, no parameter gradients; the Dice gradient still reaches G) when ``train_segmenter``
is False, and absent (λseg unused) when ``seg_network`` is None.

With ``precision="bf16"`` (or ``"auto"`` where bf16 is native, :func:`~scripts.runtime.precision.training_precision`)
every forward pass of G, D and S runs under bf16 autocast; weights, gradients and optimizer states stay fp32, and
the losses, the gradient penalty's norm and the Dice term are reduced in fp32 (:mod:`scripts.runtime.losses`).
"""

from __future__ import annotations

from typing import Any

import torch
from monai.engines import Trainer
from monai.engines.utils import default_prepare_batch
from torch.optim import Optimizer

from .data import draw_targets
from .losses import critic_loss, generator_loss, segmenter_update_loss
from .precision import autocast, training_precision

#: The scalar terms an iteration reports (StatsHandler / TensorBoard tags).
LOSS_KEYS = ("d_loss", "d_real", "d_fake", "d_cls", "d_gp", "g_loss", "g_adv", "g_cls", "g_l1", "g_seg", "s_loss")


def loss_terms(output: dict) -> dict[str, float]:
    """The scalar loss terms of one iteration's output as Python floats, for ``StatsHandler``,
    ``TensorBoardStatsHandler`` and ``MLFlowHandler``.

    The trainer leaves the terms on the device (reading one waits for the GPU to finish the iteration); the
    handlers call this only on the iterations they log, and all terms come over in one transfer."""
    keys = [k for k in LOSS_KEYS if k in output]
    on_device = [k for k in keys if isinstance(output[k], torch.Tensor)]
    values = torch.stack([output[k].detach().float().reshape(()) for k in on_device]).tolist() if on_device else []
    floats = dict(zip(on_device, values))
    return {k: floats[k] if k in floats else float(output[k]) for k in keys}


class TCMGANTrainer(Trainer):
    """GAN trainer for pix2pix / MGAN / TC-MGAN / TC-MGAN bw (see the module docstring for the iteration).

    Args:
        device: device of the networks and batches.
        max_epochs: epochs to run.
        train_data_loader: loader yielding dicts with ``image`` ``(B, 4, H, W)`` and ``label`` ``(B, 1, H, W)``, and
            optionally ``source`` ``(B, k, H, W)``: G's input instead of the T2 channel (k neighbouring T2 slices,
            augmented; the critic then gets its centre slice as the source).
        g_network: a :class:`scripts.runtime.networks.SynthesisNet` (``g(x, labels)`` synthesises one target per sample).
        g_optimizer, d_optimizer: optimizers of G and D.
        d_network: critic ``d(source, target, labels) -> (src, cls or None)``.
        seg_network: tumour segmenter ``s(y, labels) -> logits``, or None (pix2pix, MGAN).
        s_optimizer: optimizer of S, used when ``train_segmenter`` is True.
        seg_loss_function: Dice loss on S's logits (MONAI ``DiceLoss(sigmoid=True)``).
        train_segmenter: update S jointly (TC-MGAN bw) instead of keeping it frozen.
        lambda_l1, lambda_cls, lambda_seg, lambda_gp: loss weights (paper: 0.1, 10, 50, 100).
        tumour_l1_weight: extra weight of the tumour's pixels in the L1 term (0: the paper's plain L1).
        d_train_steps: critic steps per generator step (n_critic; reference: 1).
        reduction: ``"sum"`` (per image, reference) or ``"mean"`` for the critic score and L1.
        num_targets: number of target modalities.
        epoch_length: iterations per epoch (default: the loader's length).
        draw: step 1 of the iteration, ``draw(image, label, source) -> (g_inputs, x, k, y, tumour, seg_rows)``: G is
            called as ``g(*g_inputs, labels=k)``, the critic is conditioned on ``x``, ``seg_rows`` (None: all) are
            the samples the tumour-consistency term covers. Default :meth:`paper_draw`;
            :class:`scripts.runtime.anymissing.AvailabilityDraw` for the any-missing generator.
        precision: ``"fp32"`` (default), ``"bf16"`` (autocast, fp32 master weights) or ``"auto"`` (bf16 where it is
            native, :func:`~scripts.runtime.precision.training_precision`); the one used is ``self.precision``.
        other arguments: as in MONAI's ``Trainer``.
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader,
        g_network: torch.nn.Module,
        g_optimizer: Optimizer,
        d_network: torch.nn.Module,
        d_optimizer: Optimizer,
        seg_network: torch.nn.Module | None = None,
        s_optimizer: Optimizer | None = None,
        seg_loss_function=None,
        train_segmenter: bool = False,
        lambda_l1: float = 0.1,
        lambda_cls: float = 10.0,
        lambda_seg: float = 50.0,
        lambda_gp: float = 100.0,
        tumour_l1_weight: float = 0.0,
        d_train_steps: int = 1,
        reduction: str = "sum",
        num_targets: int = 3,
        epoch_length: int | None = None,
        draw=None,
        precision: str = "fp32",
        non_blocking: bool = False,
        prepare_batch=default_prepare_batch,
        key_train_metric=None,
        additional_metrics=None,
        train_handlers=None,
        **kwargs: Any,
    ):
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            data_loader=train_data_loader,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            prepare_batch=prepare_batch,
            key_metric=key_train_metric,
            additional_metrics=additional_metrics,
            handlers=train_handlers,
            decollate=False,
            **kwargs,
        )
        if seg_network is not None and seg_loss_function is None:
            raise ValueError("seg_network given without seg_loss_function")
        if train_segmenter and (seg_network is None or s_optimizer is None):
            raise ValueError("train_segmenter=True needs seg_network and s_optimizer")
        self.g_network, self.g_optimizer = g_network, g_optimizer
        self.d_network, self.d_optimizer = d_network, d_optimizer
        self.seg_network, self.s_optimizer = seg_network, s_optimizer
        self.seg_loss_function = seg_loss_function
        self.train_segmenter = train_segmenter
        self.lambda_l1, self.lambda_cls, self.lambda_seg, self.lambda_gp = lambda_l1, lambda_cls, lambda_seg, lambda_gp
        self.tumour_l1_weight = tumour_l1_weight
        self.d_train_steps = d_train_steps
        self.reduction = reduction
        self.num_targets = num_targets
        self.draw = draw if draw is not None else self.paper_draw
        self.precision = training_precision(precision, torch.device(device).type)
        if seg_network is not None and not train_segmenter:
            seg_network.eval().requires_grad_(False)

    def paper_draw(self, image: torch.Tensor, label: torch.Tensor, source: torch.Tensor | None):
        """Step 1 for the paper's variants: a random target per sample (:func:`draw_targets`); G reads the T2
        slice, or the ``source`` stack when the batch has one (2.5D context and/or augmented T2; the critic then
        gets its centre slice)."""
        x, k, y, tumour = draw_targets(image, label, self.num_targets)
        if source is None:
            return (x,), x, k, y, tumour, None
        centre = source.shape[1] // 2
        return (source,), source[:, centre : centre + 1], k, y, tumour, None

    def _iteration(self, engine: TCMGANTrainer, batchdata: dict) -> dict:
        image, label = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking)[:2]
        source = batchdata.get("source")
        if source is not None:
            source = source.to(engine.state.device, non_blocking=engine.non_blocking)
        g_in, x, k, y, tumour, seg_rows = self.draw(image, label, source)
        out: dict[str, Any] = {"condition": x, "real": y, "modality": k}  # condition: the critic's (the T2)
        g, d, s = self.g_network, self.d_network, self.seg_network
        g.train()
        d.train()
        if s is not None:
            s.train(self.train_segmenter)

        device_type = engine.state.device.type if isinstance(engine.state.device, torch.device) else "cpu"

        def amp():  # a fresh autocast context per use (bf16 or disabled)
            return autocast(self.precision, device_type)

        # critic step(s), eq. (6)
        for _ in range(self.d_train_steps):
            with torch.no_grad(), amp():
                fake = g(*g_in, labels=k)
            self.d_optimizer.zero_grad(set_to_none=True)
            with amp():
                d_loss, d_terms = critic_loss(d, x, y, fake, k, self.lambda_cls, self.lambda_gp, self.reduction)
            d_loss.backward()
            self.d_optimizer.step()

        # generator step, eq. (7) with the tumour-consistency term eq. (4)
        d.requires_grad_(False)
        self.g_optimizer.zero_grad(set_to_none=True)
        with amp():
            fake = g(*g_in, labels=k)
            g_loss, g_terms = generator_loss(
                d, x, y, fake, k, self.lambda_cls, self.lambda_l1, self.lambda_seg, self.reduction,
                segmenter=s, tumour=tumour, dice=self.seg_loss_function, seg_rows=seg_rows,
                tumour_l1_weight=self.tumour_l1_weight,
            )  # fmt: skip
        g_loss.backward()
        self.g_optimizer.step()
        d.requires_grad_(True)

        # joint segmenter step (TC-MGAN bw)
        if self.train_segmenter:
            self.s_optimizer.zero_grad(set_to_none=True)
            with amp():
                s_loss, _ = segmenter_update_loss(s, fake, y, k, tumour, self.seg_loss_function)
            s_loss.backward()
            self.s_optimizer.step()
            out["s_loss"] = s_loss.detach()

        out["fake"] = fake.detach().float()
        terms = {**d_terms, **g_terms}  # the last critic step's terms, as before
        # detached 0-d tensors, not floats: ``.item()`` here would make the CPU wait for the GPU every iteration
        # (no overlap of the next batch's loading with this step's kernels); see :func:`loss_terms`
        out.update({name: value.detach() for name, value in terms.items()})
        return out


class WeightAverage:
    """An exponential moving average of the generator's weights, updated after every iteration, for the model
    that is scored and saved (validation, model selection, ``model.pt``) while the training itself goes on with
    the raw weights. A GAN generator's weights oscillate from pass to pass; the average removes the luck of the
    pass (``docs/quality.md``).

    The average is PyTorch's :class:`torch.optim.swa_utils.AveragedModel` (buffers averaged too) with a warm-up:
    the decay of update ``n`` is ``min(decay, (1 + n) / (10 + n))``, so a short run's average is not the
    initial weights. It is checkpointed with the rest of the training state (``checkpoint_contents``).

    Args:
        network: the generator (unwrapped, not DDP).
        decay: the average's decay per iteration (0.999: about the last 1,000 iterations); 0 disables it:
            :attr:`scored` is then ``network`` itself and nothing is attached.
    """

    def __init__(self, network: torch.nn.Module, decay: float = 0.0):
        if not 0.0 <= float(decay) < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {decay}")
        self.network, self.decay = network, float(decay)
        self.average = None
        if self.decay > 0:
            cap = self.decay

            def ema(averaged, current, n):  # n: the updates so far (a tensor)
                rate = 1.0 - torch.clamp((1.0 + n) / (10.0 + n), max=cap)
                return averaged + (current - averaged) * rate

            self.average = torch.optim.swa_utils.AveragedModel(network, avg_fn=ema, use_buffers=True)
            self.average.requires_grad_(False)

    @property
    def scored(self) -> torch.nn.Module:
        """The network to validate, select and save: the average's copy of G, or G when averaging is off."""
        return self.network if self.average is None else self.average.module

    def attach(self, engine) -> None:
        from ignite.engine import Events

        if self.average is not None:
            engine.add_event_handler(Events.ITERATION_COMPLETED, self.update)

    def update(self, engine=None) -> None:
        self.average.update_parameters(self.network)


class StepSchedule:
    """Multiplicative learning-rate factor for ``torch.optim.lr_scheduler.LambdaLR`` stepped once per epoch.

    The paper's schedule: 2e-4, then 1e-4, 5e-5 and 1e-5 after 30 %, 60 % and 90 % of the epochs, i.e. factors
    ``(1, 0.5, 0.25, 0.05)`` at ``milestones=(0.3, 0.6, 0.9)`` of ``max_epochs``.
    """

    def __init__(self, max_epochs: int, milestones=(0.3, 0.6, 0.9), factors=(1.0, 0.5, 0.25, 0.05)):
        if len(factors) != len(milestones) + 1:
            raise ValueError("factors must have one more entry than milestones")
        self.boundaries = [round(m * max_epochs) for m in milestones]
        self.factors = [float(f) for f in factors]

    def __call__(self, epoch: int) -> float:
        return self.factors[sum(epoch >= b for b in self.boundaries)]
