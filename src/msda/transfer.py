"""Pretraining at 9 km and the four transfer methods: finetune, MS, DA, MSDA (METHOD.md section 5).

Loss of one member: ``alpha * MSE_50m + (1 - alpha) * MSE_9km + beta * D(features_S, features_T)``
with D = CORAL (Eq. 2) or MMD on the 32 bottleneck features. Three streams of ``batch`` samples
each: labeled 50 m (one pass = one epoch), 9 km and unlabeled 50 m target (drawn without
replacement, reshuffled only when exhausted). A stream that a method does not use is never drawn
or computed: finetune uses the labeled stream only, MS adds 9 km, DA adds the target, MSDA all.

All members train together (``msda.network.stacked``): each step draws one set of batches, computes
every member's loss and takes one Adam step over the stacked parameters. Members stay
independent: member k's loss depends only on member k's parameters, and Adam is elementwise,
so this is the same as adapting each member alone on the same batches.
"""

from __future__ import annotations

import time
from typing import NamedTuple
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from msda.losses import DOMAIN_LOSSES, mse
from msda.network.model import DenseSME
from msda.network.engines import inference_engine, training_engine
from msda.runtime import bar_interval, resolve_device, tune_allocator
from msda.schema import FeatureSchema
from msda.settings import DEFAULT_ALPHA, METHODS, LossWeights, TrainSettings, TransferError  # noqa: F401 (re-exported)
from msda.network.stacked import PartedEnsemble, member_cost
from msda.tables import TRUTH, Samples

class Stream:
    """Batches of indices drawn without replacement; a new permutation only when exhausted.

    A batch that reaches the end of a permutation is completed from the next one, so every
    index is drawn exactly once per pass.
    """

    def __init__(self, n: int, rng: np.random.Generator, device: torch.device):
        if n < 1:
            raise TransferError("a stream needs at least one sample")
        self.n, self.rng, self.device = n, rng, device
        self._perm = self._new()
        self._pos = 0
        self.passes = 0

    def _new(self) -> torch.Tensor:
        return torch.from_numpy(self.rng.permutation(self.n)).to(self.device)

    def take(self, k: int) -> torch.Tensor:
        parts = []
        while k > 0:
            if self._pos == self.n:
                self._perm, self._pos = self._new(), 0
                self.passes += 1
            step = min(k, self.n - self._pos)
            parts.append(self._perm[self._pos : self._pos + step])
            self._pos += step
            k -= step
        return parts[0] if len(parts) == 1 else torch.cat(parts)


def epoch_batches(n: int, batch: int, rng: np.random.Generator, device: torch.device) -> list[torch.Tensor]:
    """One pass over n labeled samples in shuffled batches; a last batch of 1 joins the one before."""
    perm = torch.from_numpy(rng.permutation(n)).to(device)
    cuts = list(range(0, n, batch)) + [n]
    if len(cuts) > 2 and cuts[-1] - cuts[-2] < 2:
        del cuts[-2]
    return [perm[a:b] for a, b in zip(cuts[:-1], cuts[1:])]


class WeightAverage:
    """Running mean of state dicts (parameters and batch-norm statistics)."""

    def __init__(self) -> None:
        self.count = 0
        self.sums: dict[str, torch.Tensor] = {}
        self.last: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def update(self, state: dict[str, torch.Tensor]) -> None:
        self.count += 1
        for k, v in state.items():
            if v.is_floating_point():
                if k in self.sums:
                    self.sums[k] += v
                else:
                    self.sums[k] = v.detach().clone()
            else:
                self.last[k] = v.detach().clone()

    def result(self) -> dict[str, torch.Tensor]:
        if not self.count:
            raise TransferError("no weights to average")
        return {**{k: v / self.count for k, v in self.sums.items()}, **self.last}


@dataclass
class FitData:
    """Tensors of one fit, on the training device. ``coarse`` / ``target`` may be None."""

    x_labeled: torch.Tensor
    y_labeled: torch.Tensor
    x_coarse: torch.Tensor | None = None
    y_coarse: torch.Tensor | None = None
    x_target: torch.Tensor | None = None


@dataclass
class FitResult:
    ensemble: DenseSME
    losses: list[dict] = field(default_factory=list)  # per member and epoch
    beta: list[float] = field(default_factory=list)  # per member
    seconds: float = 0.0
    steps: int = 0
    device: str = "cpu"
    parts: int = 1  # the members were trained in this many parts (TrainSettings.parts)


@torch.no_grad()
def eq4_beta(ensemble: DenseSME, data: FitData, alpha: float, domain_loss: str, batch: int = 128,
             seed: int = 0, chunk: int = 8192) -> torch.Tensor:
    """Eq. 4 per member: beta = alpha * MSE_50m / D, pretrained member, eval mode.

    D is the domain loss as training sees it (METHOD.md section 5): the mean over one pass of
    the labeled samples in batches of ``batch``, each against a batch of ``batch`` target samples
    (drawn without replacement, as the training stream draws them), so that at the start
    ``beta * E[D_batch] = alpha * MSE``. A covariance of 128 samples has a noise floor that the
    domain loss of whole sets lacks, so a beta from whole sets would weigh the domain term
    higher than Eq. 4 means. MSE is over all labeled samples. A member whose D is 0 gets beta
    0. Runs on the inference engine (batch norms folded, convolutions in C on CPU).
    """
    if data.x_target is None:
        raise TransferError("beta = auto needs target samples")
    engine = inference_engine(ensemble, device=data.x_labeled.device)

    def run(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outs = [engine.member_features(part) for part in x.split(chunk)]
        return torch.cat([o[0] for o in outs], 1), torch.cat([o[1] for o in outs], 1)

    y, f_s = run(data.x_labeled)
    _, f_t = run(data.x_target)
    fine = mse(y, data.y_labeled)
    rng_lab, rng_tgt = (np.random.default_rng(s) for s in np.random.SeedSequence([seed, 4]).spawn(2))
    device = f_s.device
    target = Stream(f_t.shape[1], rng_tgt, device)
    loss = DOMAIN_LOSSES[domain_loss]
    parts = [loss(f_s[:, idx].double(), f_t[:, target.take(batch)].double())
             for idx in epoch_batches(f_s.shape[1], batch, rng_lab, device)]
    dom = torch.stack(parts).mean(0).to(fine.dtype)
    return torch.where(dom > 0, alpha * fine / dom.clamp_min(torch.finfo(fine.dtype).tiny), torch.zeros_like(fine))


class Step(NamedTuple):
    """The rows of one training step: labeled, then target, then 9 km, and the truths."""

    x: torch.Tensor
    y_fine: torch.Tensor
    n_labeled: int
    n_target: int
    y_coarse: torch.Tensor | None


class StepLosses(NamedTuple):
    """One step's losses per member, shape (members,): the joint loss and its terms (None when unused)."""

    total: torch.Tensor
    fine: torch.Tensor
    coarse: torch.Tensor | None
    domain: torch.Tensor | None


class FitStreams:
    """A fit's samples on the device and the three streams that draw from them: the labeled
    samples in epoch permutations; target and 9 km samples without replacement, as needed."""

    def __init__(self, data: FitData, weights: LossWeights, use_domain: bool, seed: int, device: torch.device):
        rng_lab, rng_9km, rng_tgt = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))
        self.rng_lab, self.device = rng_lab, device
        self.x_lab, self.y_lab = data.x_labeled.to(device), data.y_labeled.to(device)
        self.n_labeled = self.x_lab.shape[0]
        self.x_c = data.x_coarse.to(device) if weights.uses_9km else None
        self.y_c = data.y_coarse.to(device) if weights.uses_9km else None
        self.x_t = data.x_target.to(device) if use_domain else None
        self.coarse = Stream(self.x_c.shape[0], rng_9km, device) if self.x_c is not None else None
        self.target = Stream(self.x_t.shape[0], rng_tgt, device) if self.x_t is not None else None

    def batches(self, batch: int) -> int:
        """Steps per epoch."""
        return len(epoch_batches(self.n_labeled, batch, np.random.default_rng(0), torch.device("cpu")))

    def epoch(self, batch: int) -> list[tuple]:
        """The epoch's batches of indices (labeled, target, 9 km), drawn here in one order whatever the parts."""
        return [(idx, self.target.take(batch) if self.target is not None else None,
                 self.coarse.take(batch) if self.coarse is not None else None)
                for idx in epoch_batches(self.n_labeled, batch, self.rng_lab, self.device)]

    def make(self, idx: torch.Tensor, it: torch.Tensor | None, ic: torch.Tensor | None) -> Step:
        rows, yc = [self.x_lab[idx]], None
        if it is not None:
            rows.append(self.x_t[it])
        if ic is not None:
            rows.append(self.x_c[ic])
            yc = self.y_c[ic]
        x = torch.cat(rows) if len(rows) > 1 else rows[0]
        return Step(x, self.y_lab[idx], idx.shape[0], 0 if it is None else it.shape[0], yc)


def joint_loss(alpha: float, domain_loss: str):
    """Eq. 1 per member, as a function of (part, its members' betas, step) -> ``StepLosses``:
    alpha * MSE(50 m) + (1 - alpha) * MSE(9 km) + beta * D(labeled features, target features)."""
    domain = DOMAIN_LOSSES[domain_loss]

    def losses(part, beta_part: torch.Tensor, step: Step) -> StepLosses:
        y, f = part(step.x, internal_order=True)
        n_l, n_t = step.n_labeled, step.n_target
        fine = mse(y[:, :n_l], step.y_fine)
        total = alpha * fine
        coarse = dom = None
        if step.y_coarse is not None:
            coarse = mse(y[:, n_l + n_t :], step.y_coarse)
            total = total + (1 - alpha) * coarse
        if n_t:
            dom = domain(f[:, :n_l], f[:, n_l : n_l + n_t])
            total = total + beta_part * dom
        return StepLosses(total, fine, coarse, dom)

    return losses


def _check_fit(data: FitData, weights: LossWeights, settings: TrainSettings) -> None:
    settings.check()
    weights.check()
    n_lab = data.x_labeled.shape[0]
    if n_lab < 2:
        raise TransferError(f"need at least 2 labeled samples, got {n_lab}")
    if weights.uses_9km and (data.x_coarse is None or data.x_coarse.shape[0] < 2):
        raise TransferError(f"alpha = {weights.alpha} < 1 needs 9 km samples, but there are none")
    if weights.uses_target and (data.x_target is None or data.x_target.shape[0] < 2):
        raise TransferError("the domain loss needs unlabeled target samples, but there are none")


def _member_betas(ensemble: DenseSME, data: FitData, weights: LossWeights, settings: TrainSettings,
                  device: torch.device) -> torch.Tensor:
    """beta per member: Eq. 4 for ``beta = 'auto'``, else the number given."""
    if weights.beta == "auto":
        return eq4_beta(ensemble, FitData(data.x_labeled.to(device), data.y_labeled.to(device),
                                          x_target=data.x_target.to(device)),
                        weights.alpha, weights.domain_loss, settings.batch, settings.seed)
    return torch.full((len(ensemble.specs),), float(weights.beta), device=device)


def _history_rows(names: list[str], order: list[int], epoch: int, means: np.ndarray, seconds: float,
                  streams: FitStreams) -> list[dict]:
    """One epoch's loss rows, a row per member: means (4, members) in the trainer's ``order``."""
    return [{"member": names[i], "epoch": epoch + 1, "joint": means[0, j], "fine_50m": means[1, j],
             "coarse_9km": means[2, j] if streams.coarse is not None else np.nan,
             "domain": means[3, j] if streams.target is not None else np.nan, "seconds": seconds}
            for j, i in enumerate(order)]


def fit(
    ensemble: DenseSME,
    data: FitData,
    weights: LossWeights,
    settings: TrainSettings,
    progress: bool = True,
    on_epoch_end: Callable[[int, PartedEnsemble], None] | None = None,
    description: str = "adapt",
    monitor: tuple[torch.Tensor, torch.Tensor] | None = None,
    monitor_every: int = 0,
) -> FitResult:
    """Train all members of ``ensemble`` together with the loss ``weights``; returns a new ensemble.

    The input ensemble is not modified. The result holds the mean of the weights at the end of
    the last ``settings.average_last`` epochs. ``monitor`` = (x, y): every ``monitor_every``
    epochs, the RMSE of the current ensemble mean on these samples is added to the epoch's
    loss rows (``monitor_rmse``); off by default, as it costs a forward pass over them.
    Stages: the streams (``FitStreams``), the trainer (``training_engine``), the epoch loop
    (``_run_epochs``), the averaged weights.
    """
    _check_fit(data, weights, settings)
    device = resolve_device(settings.device)
    if device.type == "cpu":
        tune_allocator()
    started = time.perf_counter()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(settings.seed)
        rows = settings.batch * (1 + weights.uses_9km + weights.uses_target)
        trainer_net = training_engine(ensemble, settings.parts or auto_parts(ensemble.specs, rows, device),
                                      settings.seed, device)
        beta = _member_betas(ensemble, data, weights, settings, device)
        streams = FitStreams(data, weights, weights.uses_target and bool((beta > 0).any()), settings.seed, device)
        # training runs in the stacked (width-grouped) member order
        trainer = _PartsTrainer(trainer_net, beta[torch.tensor(trainer_net.order, device=device)],
                                joint_loss(float(weights.alpha), weights.domain_loss), settings, device)
        averager = WeightAverage()
        history, steps = _run_epochs(ensemble, trainer, streams, averager, settings, progress, description,
                                     on_epoch_end, monitor, monitor_every)
        trainer_net.load_state_dict(averager.result())
        result = trainer_net.to_ensemble()
    if getattr(ensemble, "provenance", None) is not None:
        result.provenance = dict(ensemble.provenance)  # type: ignore[attr-defined]
    return FitResult(ensemble=result, parts=len(trainer_net.parts), losses=history, beta=[float(b) for b in beta.cpu()],
                     seconds=time.perf_counter() - started, steps=steps, device=str(device))


def _run_epochs(ensemble: DenseSME, trainer: "_PartsTrainer", streams: FitStreams, averager: "WeightAverage",
                settings: TrainSettings, progress: bool, description: str, on_epoch_end, monitor,
                monitor_every: int) -> tuple[list[dict], int]:
    """The epoch loop: steps, loss history (rows per member and epoch, members in the ensemble's
    order), weight averaging over the last epochs, monitoring. Returns (history, steps)."""
    net, m = trainer.parted, len(ensemble.specs)
    first_avg = max(settings.epochs - settings.average_last, 0)
    history: list[dict] = []
    steps = 0
    bar = tqdm(total=settings.epochs * streams.batches(settings.batch), desc=f"{description}: {m} members",
               unit=" steps", disable=not progress, mininterval=bar_interval())
    net.train()
    try:
        for epoch in range(settings.epochs):
            t0 = time.perf_counter()
            batches = streams.epoch(settings.batch)
            sums = trainer.epoch(batches, streams.make, bar.update)
            steps += len(batches)
            means = (sums / streams.n_labeled).cpu().numpy()
            history += _history_rows(ensemble.names, net.order, epoch, means, time.perf_counter() - t0, streams)
            bar.set_postfix(epoch=f"{epoch + 1}/{settings.epochs}", loss=f"{means[0].mean():.4g}", refresh=False)
            if epoch >= first_avg:
                averager.update(net.state_dict())
            if monitor is not None and monitor_every > 0 and (epoch + 1) % monitor_every == 0:
                rmse = _ensemble_rmse(net, monitor[0].to(streams.device), monitor[1].to(streams.device))
                for row in history[-m:]:
                    row["monitor_rmse"] = rmse
            if on_epoch_end is not None:
                on_epoch_end(epoch, net)
    finally:
        bar.close()
        trainer.close()
    order = {name: i for i, name in enumerate(ensemble.names)}
    history.sort(key=lambda r: (r["epoch"], order[r["member"]]))
    return history, steps


PARTS_MIN_WORK = 1.2e9  # multiply-adds per step above which two parts beat one (benchmarks/RESULTS.md)


def auto_parts(specs, rows: int, device: torch.device) -> int:
    """Parts for ``TrainSettings.parts = 0``: 2 on a CPU with at least 2 threads when a step is
    large enough (rows per step x the members' multiply-adds per sample >= ``PARTS_MIN_WORK``),
    else 1: two parts overlap one part's Python dispatch with the other's arithmetic, which pays
    only for large steps. A fit's result records the parts it used (they draw their own dropout
    masks, so another number of parts gives other, equally valid, weights)."""
    if device.type != "cpu" or torch.get_num_threads() < 2 or len(specs) < 2:
        return 1
    return 2 if rows * sum(member_cost(s) for s in specs) >= PARTS_MIN_WORK else 1


class _PartsTrainer:
    """The optimisation of every part of a ``PartedEnsemble``, an epoch at a time: per step,
    forward, the loss of each of its members, backward and Adam, each part with its own optimiser.

    On a CPU with several threads (and without ``compile``), the parts run side by side in
    threads of their own, sharing out torch's threads; elsewhere one after another. The results
    are the same either way: the parts share no parameters and draw from their own generators.
    """

    def __init__(self, parted: PartedEnsemble, beta: torch.Tensor, losses, settings: TrainSettings, device: torch.device):
        self.parted = parted
        self.opts, self.grads = [], []
        for part in parted.parts:
            flat, grad = _flat_parameters(part)
            self.opts.append(torch.optim.Adam([flat], lr=settings.lr, betas=(0.9, 0.999), eps=1e-8, **_adam_kwargs(device)))
            self.grads.append(grad)
        sizes = [len(g) for g in parted.members]
        self.betas = list(beta.split(sizes))
        self.losses = torch.compile(losses, dynamic=False) if settings.compile else losses
        threads = torch.get_num_threads()
        n = len(parted.parts)
        self.pool = None
        self._stop = False
        if n > 1 and device.type == "cpu" and threads >= n and not settings.compile:
            self.pool = ThreadPoolExecutor(n, thread_name_prefix="msda-part", initializer=torch.set_num_threads,
                                           initargs=(threads // n,))

    def _step(self, k: int, step: Step) -> StepLosses:
        self.grads[k].zero_()
        losses = self.losses(self.parted.parts[k], self.betas[k], step)
        losses.total.sum().backward()
        self.opts[k].step()
        return StepLosses(*(None if t is None else t.detach() for t in losses))

    def _epoch(self, k: int, batches, make, on_step) -> torch.Tensor:
        """Part k through all the epoch's batches: its members' sums of (total, 50 m, 9 km, domain)
        losses weighted by the labeled samples of each step (4, members of part k)."""
        sums = None
        for b in batches:
            if self._stop:
                break
            step = make(*b)
            losses = self._step(k, step)
            with torch.no_grad():
                if sums is None:
                    sums = torch.zeros(4, losses.total.shape[0], device=losses.total.device, dtype=torch.float64)
                for row, value in enumerate(losses):
                    if value is not None:
                        sums[row] += value * step.n_labeled
            if k == 0:
                on_step(1)
        return sums

    def epoch(self, batches, make, on_step) -> torch.Tensor:
        """One epoch of every part: ``make(*batch)`` gives a step's rows (``Step``); ``on_step(1)`` after each step of part 0. Returns the members'
        (4, members) loss sums in ``parted.order``.

        The parts do not wait for each other between steps (each has its own batches' copies and
        generator), only at the end of the epoch: no step waits for the slower part."""
        run = lambda k: self._epoch(k, batches, make, on_step)  # noqa: E731
        ks = range(len(self.opts))
        try:
            results = list(self.pool.map(run, ks)) if self.pool is not None else [run(k) for k in ks]
        except BaseException:
            self._stop = True  # the other parts stop at their next step
            raise
        return torch.cat(results, dim=1)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


@torch.no_grad()
def _flat_parameters(module: torch.nn.Module) -> tuple[torch.nn.Parameter, torch.Tensor]:
    """Put the parameters of ``module`` and their gradients into two flat buffers (the parameters
    become views of the first, their ``.grad`` views of the second, which backward adds into).

    Returns the buffer as one parameter whose ``.grad`` is the gradient buffer: one Adam step
    over it is the elementwise Adam of every parameter, without the per-tensor work of an
    optimiser over ~200 tensors (about 2 % of a CPU step)."""
    params = list(module.parameters())
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    grad = torch.zeros_like(flat)
    start = 0
    for p in params:
        n = p.numel()
        p.data = flat[start : start + n].view_as(p)
        p.grad = grad[start : start + n].view_as(p)
        start += n
    shared = torch.nn.Parameter(flat)
    shared.grad = grad
    return shared, grad


@torch.no_grad()
def _ensemble_rmse(stacked: PartedEnsemble, x: torch.Tensor, y: torch.Tensor, chunk: int = 8192) -> float:
    """RMSE of the ensemble mean (eval mode) on (x, y); restores training mode."""
    stacked.eval()
    try:
        pred = torch.cat([stacked(part, internal_order=True)[0].mean(0) for part in x.split(chunk)])
    finally:
        stacked.train()
    return float(torch.sqrt(torch.mean((pred - y) ** 2)))


def _adam_kwargs(device: torch.device) -> dict:
    """The fused Adam kernel where this torch has it for the device (same update, fewer calls)."""
    return {"fused": True} if device.type in ("cpu", "cuda") else {"foreach": True}


def settings_dict(weights: LossWeights, settings: TrainSettings) -> dict:
    return {**asdict(weights), **asdict(settings)}


# ----- data of one adaptation ---------------------------------------------------------------
@dataclass
class AdaptProblem:
    """Labeled, target and 9 km samples of one network for one draw of training stations."""

    network: str
    train_stations: list[str]
    labeled: pd.DataFrame  # rows of the training stations
    target: pd.DataFrame  # rows of the network's other stations (transductive test set)
    coarse: pd.DataFrame  # 9 km rows of the cells holding the network's stations
    schema: FeatureSchema

    def fit_data(self) -> FitData:
        names = self.schema.feature_names

        def x(frame) -> torch.Tensor:
            return torch.from_numpy(frame[names].to_numpy(np.float32, copy=True))

        def y(frame) -> torch.Tensor:
            return torch.from_numpy(frame[TRUTH].to_numpy(np.float32, copy=True))

        return FitData(
            x_labeled=x(self.labeled),
            y_labeled=y(self.labeled),
            x_coarse=x(self.coarse) if len(self.coarse) else None,
            y_coarse=y(self.coarse) if len(self.coarse) else None,
            x_target=x(self.target) if len(self.target) else None,
        )


def draw_stations(stations: list[str], n: int, seed: int) -> list[str]:
    """n distinct stations drawn at random (sorted names, numpy Generator(seed))."""
    pool = sorted(stations)
    rng = np.random.default_rng(seed)
    return sorted(pool[i] for i in rng.choice(len(pool), size=n, replace=False))


def adapt_problem(
    fine: Samples,
    coarse: Samples | None,
    network: str,
    stations: int | list[str],
    seed: int = 0,
) -> AdaptProblem:
    """Split ``network`` of ``fine`` into training stations (n drawn with ``seed``, or a list) and
    target stations, and take the 9 km rows of the cells of all the network's stations (none
    without a 9 km table: finetune and DA need none)."""
    if coarse is not None and not fine.schema.same_layout(coarse.schema):
        raise TransferError(f"{fine.source} and {coarse.source} use different feature schemas")
    if "network" not in fine.frame or "station" not in fine.frame:
        raise TransferError(f"{fine.source}: needs 'network' and 'station' columns to adapt")
    net_rows = fine.frame[fine.frame["network"].astype(str) == network]
    if net_rows.empty:
        raise TransferError(f"{fine.source}: no samples of network {network!r} (networks: {', '.join(fine.networks)})")
    names = sorted(net_rows["station"].astype(str).unique())
    if isinstance(stations, int):
        if stations < 1:
            raise TransferError(f"--stations must be >= 1, got {stations}")
        if stations >= len(names):
            raise TransferError(
                f"network {network} has {len(names)} stations in {fine.source}; at most {len(names) - 1} can "
                f"train (at least one must stay as the target), asked for {stations}"
            )
        chosen = draw_stations(names, stations, seed)
    else:
        chosen = sorted({str(s) for s in stations})
        unknown = [s for s in chosen if s not in names]
        if unknown:
            raise TransferError(f"station {unknown[0]!r} is not a station of network {network} in {fine.source}")
        if not chosen:
            raise TransferError("the station list is empty")
        if len(chosen) == len(names):
            raise TransferError(f"all {len(names)} stations of {network} would train; none is left as the target")
    is_train = net_rows["station"].astype(str).isin(chosen)
    labeled, target = net_rows[is_train], net_rows[~is_train]
    if coarse is None:
        return AdaptProblem(network, chosen, labeled, target, fine.frame.iloc[:0], fine.schema)
    cells = net_rows[["r", "c"]].drop_duplicates()
    cf = coarse.frame
    key = pd.MultiIndex.from_frame(cf[["r", "c"]].astype(np.int64))
    inside = key.isin(pd.MultiIndex.from_frame(cells.astype(np.int64)))
    return AdaptProblem(network, chosen, labeled, target, cf[inside], fine.schema)
