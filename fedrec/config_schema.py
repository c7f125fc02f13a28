"""The dataclasses of every experiment YAML key and their validation (`fedrec.config`
re-exports them with the loaders of `fedrec.config_load`).

One YAML drives every way of running (`fedrec run`, `flwr run .`). Every key is declared
here; an unknown key is rejected with the list of valid ones, and a bad value gets a
one-line `ConfigError`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import typing
from dataclasses import dataclass, field
from typing import Any


from fedrec.errors import ConfigError


@dataclass
class SyntheticConfig:
    n_users: int = 300
    n_items: int = 400
    dim: int = 8
    mean_history: float = 30.0
    min_history: int = 5
    popularity_exponent: float = 1.0
    seed: int = 0  # the dataset's own seed: experiment seeds vary training, not the data

    def validate(self):
        _range("data.synthetic.n_users", self.n_users, 1, 10**8)
        _range("data.synthetic.n_items", self.n_items, 4, 10**8)
        _range("data.synthetic.dim", self.dim, 1, 10**4)
        # histories are capped at n_items // 2 items, so every user keeps negatives
        _range("data.synthetic.min_history", self.min_history, 1, self.n_items // 2)
        _range("data.synthetic.mean_history", self.mean_history, 1, self.n_items)
        _range("data.synthetic.popularity_exponent", self.popularity_exponent, 0.0, 100.0)
        _seed("data.synthetic.seed", self.seed)


@dataclass
class DataConfig:
    dataset: str = "synthetic"  # "synthetic", a known dataset name, or a file path
    format: str = "auto"
    options: dict = field(default_factory=dict)  # loader options (user_col, sep, ...)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    kcore: int = 0
    split: str = "auto"  # auto | time | random (leave-one-out)
    attacker_pool: float = 0.05
    negatives: str = "static"  # static | fresh
    neg_ratio: int = 1
    negatives_exclude: str = "all"  # all: never any item of the user's history; train: training items only
    fixed_test: str = "first"  # fixed published splits: first (one test item per user) | all
    cache_dir: str = ""  # "" = $FEDREC_CACHE or ~/.cache/fedrec

    def validate(self):
        _choice("data.split", self.split, ("auto", "time", "random"))
        _choice("data.negatives", self.negatives, ("static", "fresh"))
        _choice("data.negatives_exclude", self.negatives_exclude, ("all", "train"))
        _choice("data.fixed_test", self.fixed_test, ("first", "all"))
        _range("data.attacker_pool", self.attacker_pool, 0.0, 0.9)
        _range("data.neg_ratio", self.neg_ratio, 1, 1000)
        _range("data.kcore", self.kcore, 0, 10_000)
        self.synthetic.validate()


@dataclass
class ModelConfig:
    name: str = "mf"  # mf | ncf | sasrec | bert4rec
    dim: int = 64
    dropout: float = 0.2
    mlp_layers: list = field(default_factory=lambda: [64, 32])  # NCF tower widths
    # sequential models (sasrec, bert4rec)
    max_len: int = 200  # items of history the encoder reads (200 for ML-1M, 50 for Beauty)
    blocks: int = 2  # transformer blocks
    heads: int = 1  # attention heads (dim must be a multiple)
    ncf_form: str = "neumf"  # neumf (GMF + MLP, FedAttack) | mlp (MLP only, PipAttack)
    # auto = bpr for mf/ncf (bpr | bce) and the model's own for sasrec/bert4rec (bce |
    # sampled_softmax | full_softmax_dense); bce for mf/ncf: PipAttack's pointwise loss
    loss: str = "auto"
    softmax_samples: int = 100  # negatives per client for sampled_softmax
    mask_prob: float = 0.2  # BERT4Rec cloze masking probability
    mask_last_prob: float = 0.1  # BERT4Rec: share of client rounds that mask only the last item
    device: str = "auto"  # auto | cpu | cuda (sequential models; auto = cuda when present)

    def validate(self):
        _range("model.dim", self.dim, 1, 4096)
        _range("model.dropout", self.dropout, 0.0, 0.95)
        if not all(isinstance(w, int) and w > 0 for w in self.mlp_layers):
            raise ConfigError("model.mlp_layers: expected a list of positive integers")
        _range("model.max_len", self.max_len, 2, 100_000)
        _range("model.blocks", self.blocks, 1, 64)
        _range("model.heads", self.heads, 1, 64)
        _choice("model.ncf_form", self.ncf_form, ("neumf", "mlp"))
        pairwise = self.name in ("mf", "ncf")
        _choice("model.loss", self.loss, ("auto", "bpr", "bce") if pairwise else
                ("auto", "bce", "sampled_softmax", "full_softmax_dense"))
        _range("model.softmax_samples", self.softmax_samples, 1, 10**7)
        _range("model.mask_prob", self.mask_prob, 0.0, 1.0)
        _range("model.mask_last_prob", self.mask_last_prob, 0.0, 1.0)
        _choice("model.device", self.device, ("auto", "cpu", "cuda"))


@dataclass
class TrainConfig:
    rounds: int = 100
    clients_per_round: int = 50
    batch_size: int = 512
    weight_decay: float = 1e-5
    weight_decay_scope: str = "touched"  # touched | all
    local_epochs: int = 0  # 0 = FedSGD gradient at the global model; E >= 1 uploads a delta
    local_lr: float = 0.01
    sampling: str = "uniform"  # uniform | epoch (each user once per epoch)
    user_optimizer: str = "adam_sync"  # adam_sync | adam | sgd
    user_lr: float = -1.0  # < 0: same as server.lr
    loss_reduction: str = "mean"  # mean | sum: the gradient of the mean or of the summed loss over the pairs
    contrastive_alpha: float = 0.0  # UNION's client side: loss = BPR + alpha * contrastive (0 = off)
    contrastive_negatives: int = 15  # negatives per anchor in the contrastive loss
    # inverted dropout on the contrastive term's item rows (0 = none; the UNION reference code
    # applies its embedding dropout, 0.2, to them)
    contrastive_dropout: float = 0.0

    def validate(self):
        _range("train.rounds", self.rounds, 1, 10**8)
        _range("train.clients_per_round", self.clients_per_round, 1, 10**8)
        _range("train.batch_size", self.batch_size, 1, 10**8)
        _range("train.weight_decay", self.weight_decay, 0.0, 1.0)
        _choice("train.weight_decay_scope", self.weight_decay_scope, ("touched", "all"))
        _range("train.local_epochs", self.local_epochs, 0, 1000)
        _choice("train.sampling", self.sampling, ("uniform", "epoch"))
        _choice("train.user_optimizer", self.user_optimizer, ("adam_sync", "adam", "sgd"))
        _choice("train.loss_reduction", self.loss_reduction, ("mean", "sum"))
        _range("train.contrastive_alpha", self.contrastive_alpha, 0.0, 1e6)
        _range("train.contrastive_negatives", self.contrastive_negatives, 1, 10_000)
        if not 0.0 <= self.contrastive_dropout < 1.0:
            raise ConfigError(f"train.contrastive_dropout: expected a rate in [0, 1), got "
                              f"{self.contrastive_dropout!r}")
        if self.contrastive_alpha > 0 and self.local_epochs > 0:
            raise ConfigError("train.contrastive_alpha: the contrastive loss is implemented for "
                              "FedSGD uploads (train.local_epochs: 0)")


@dataclass
class ServerConfig:
    optimizer: str = "adam"  # adam | sgd
    lr: float = 0.002
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    aggregation: str = "dense"  # dense | item
    rule: str = "mean"  # aggregation rule (see fedrec/registry.py)
    rule_f: int = 2  # robust rules: assumed Byzantine clients per round (trimmed per side)
    multikrum_m: int = 0  # updates Multi-Krum keeps (0 = n - rule_f)
    norm_bound: float = 0.1  # norm_bound: L2 clip (UNION code 0.1; FedAttack used 2)
    # pre-aggregation steps, in order, before server.rule (fedrec/registry.py FILTERS):
    # union | detector | clip, e.g. [clip] + rule krum = "clip, then Krum"
    filters: list = field(default_factory=list)
    filter: str = "none"  # the older single-step key: union | detector = filters: [that]
    union_sample_items: int = 500  # item ids UNION samples (with replacement) per round
    union_gap_b: int = 50  # reference draws of the gap statistic
    union_expected_attackers: int = -1  # minor clusters this small are dropped (< 0: rule_f)
    union_device: str = "cpu"  # cpu | cuda | auto: where UNION's pairwise distances are computed
    detector_path: str = ""  # detector: `fedrec detector train`'s file ({attack} = attack.name)
    detector_threshold: float = 0.5  # detector: drop uploads scored at or above this
    weighting: str = "samples"  # samples | uniform
    max_upload_rows: int = 0  # 0 = n_items; bigger uploads are dropped
    max_samples: int = 10_000_000  # a claimed sample count above this is dropped
    # uploads with a value beyond +-this are dropped (honest gradients are ~1e-2; the bound
    # keeps every sum, rule and Adam moment finite; see README "What the server guarantees")
    max_abs_value: float = 1e4
    # round: one optimizer step on the round's aggregate; upload: one step per accepted upload,
    # in the order the clients were sampled (FedAttack's code: one Adam step per user), every
    # upload computed at the round's starting model; needs rule mean and no filters
    step: str = "round"

    def validate(self):
        _choice("server.optimizer", self.optimizer, ("adam", "sgd"))
        _choice("server.step", self.step, ("round", "upload"))
        if self.step == "upload" and (self.rule != "mean" or self.filter_steps()):
            raise ConfigError("server.step: upload steps on each upload alone, so it needs "
                              f"server.rule mean and no filters (got rule {self.rule!r}, "
                              f"filters {self.filter_steps()})")
        _choice("server.aggregation", self.aggregation, ("dense", "item"))
        _choice("server.weighting", self.weighting, ("samples", "uniform"))
        _range("server.lr", self.lr, 0.0, 100.0)
        _range("server.max_abs_value", self.max_abs_value, 1e-30, 1e20)
        _range("server.max_samples", self.max_samples, 1, 10**9)
        _range("server.rule_f", self.rule_f, 0, 10**8)
        _range("server.multikrum_m", self.multikrum_m, 0, 10**8)
        _choice("server.filter", self.filter, ("none", "union", "detector"))
        if not isinstance(self.filters, list) or not all(isinstance(f, str) for f in self.filters):
            raise ConfigError(f"server.filters: expected a list of names, got {self.filters!r}")
        if self.filters and self.filter != "none":
            raise ConfigError("server.filter and server.filters are both set; list every step "
                              "in server.filters")
        # the names are checked against fedrec.registry.FILTERS when the strategy is built
        _range("server.detector_threshold", self.detector_threshold, 0.0, 1.0)
        if "detector" in self.filter_steps() and not self.detector_path:
            raise ConfigError("server.detector_path: required with the detector filter")
        _range("server.union_sample_items", self.union_sample_items, 2, 10**7)
        _range("server.union_gap_b", self.union_gap_b, 2, 10_000)
        _range("server.union_expected_attackers", self.union_expected_attackers, -1, 10**8)
        _choice("server.union_device", self.union_device, ("cpu", "cuda", "auto"))
        if not self.norm_bound > 0:
            raise ConfigError(f"server.norm_bound: expected a number > 0, got {self.norm_bound!r}")
        if len(self.betas) != 2 or not all(0 <= float(b) < 1 for b in self.betas):
            raise ConfigError("server.betas: expected two numbers in [0, 1)")

    def filter_steps(self) -> list:
        """The pre-aggregation steps in order (server.filters, or the older server.filter)."""
        return list(self.filters) if self.filters else ([] if self.filter == "none" else [self.filter])


@dataclass
class AttackConfig:
    """The untargeted attack (clients/malicious/, registry in fedrec/registry.py)."""

    name: str = "none"  # none | labelflip | gaussian | lie | fang | dynopt | fedattack | clusterattack | spattack
    malicious_fraction: float = 0.01  # of all users, drawn from the attacker pool (data.attacker_pool)
    start_round: int = 1  # attack_start_round: malicious clients train honestly before it
    knowledge: str = "default"  # default (the attack's own) | local | colluding | omniscient
    params: dict = field(default_factory=dict)  # the attack's own parameters (README table)
    # targeted attacks and ER@K (fedrec/targets.py): none | least_popular | an item id |
    # band:LO-HI (a seeded draw among items whose popularity percentile is in [LO, HI)), or a
    # list of these; kept in clean runs too, so their ER@K of the same target is the baseline
    target: Any = "none"
    # colluding/omniscient attacks: in every round the adversary acts, it also computes the
    # honest updates of up to this many malicious clients drawn from all of them (not only the
    # round's), as the ClusterAttack/UNION reference does (50), for its statistics; 0 = none
    pool_sample: int = 0
    # which users are malicious: drawn from the attacker pool with this seed (None = the
    # experiment's `seed`); set it to vary the attacker draw with training fixed, or the other way
    draw_seed: int | None = None

    def validate(self):
        from fedrec.targets import check_target_spec

        if self.draw_seed is not None:
            _seed("attack.draw_seed", self.draw_seed)

        check_target_spec(self.target)
        _range("attack.malicious_fraction", self.malicious_fraction, 0.0, 1.0)
        _range("attack.start_round", self.start_round, 1, 10**8)
        _choice("attack.knowledge", self.knowledge, ("default", "local", "colluding", "omniscient"))
        _range("attack.pool_sample", self.pool_sample, 0, 10**7)


@dataclass
class EvalConfig:
    every: int = 0  # evaluate every N rounds (0 = only at the end)
    # evaluations every N rounds start here (an attack on a long pretraining needs no curve of
    # the pretraining); 0 = from the start. The last round is always evaluated.
    from_round: int = 0
    ks: list = field(default_factory=lambda: [5, 10, 20])
    fraction: float = 0.1  # share of clients evaluated during training under `flwr run`
    batch_users: int = 1024
    # the splits the in-process runner ranks (test alone halves an NCF evaluation's cost)
    splits: list = field(default_factory=lambda: ["val", "test"])
    # mask the user's training items (and, for test, the validation item) out of the ranking:
    # the ranking protocol of ClusterAttack/UNION, SASRec and BERT4Rec. false: the held-out
    # item is ranked among all items, history included, as FedAttack's code evaluates
    # (ER@K keeps its masks)
    mask_history: bool = True

    def validate(self):
        if not self.splits or not all(s in ("val", "test") for s in self.splits) \
                or len(set(self.splits)) != len(self.splits):
            raise ConfigError(f"eval.splits: expected a non-empty list of val, test; got {self.splits!r}")
        _range("eval.every", self.every, 0, 10**8)
        _range("eval.from_round", self.from_round, 0, 10**8)
        if not isinstance(self.mask_history, bool):
            raise ConfigError(f"eval.mask_history: expected true or false, got {self.mask_history!r}")
        _range("eval.fraction", self.fraction, 0.0, 1.0)
        if not self.ks or not all(isinstance(k, int) and k > 0 for k in self.ks):
            raise ConfigError("eval.ks: expected a non-empty list of positive integers")


@dataclass
class OutputConfig:
    dir: str = "runs"
    name: str = ""  # "" = experiment name plus a hash of the config
    progress: bool = True
    # `fedrec run` saves a checkpoint every this many rounds (and on SIGTERM/SIGINT); rerunning
    # an interrupted run resumes from it. 0 = only on a signal
    checkpoint_every: int = 500

    def validate(self):
        _range("output.checkpoint_every", self.checkpoint_every, 0, 10**9)


@dataclass
class FlowerConfig:
    """Settings used only under `flwr run` (the in-process runner ignores them)."""

    fraction_evaluate: float = -1.0  # < 0: eval.fraction
    min_available_clients: int = 0  # 0 = every user (wait for all SuperNodes)
    round_timeout: float = 0.0  # seconds; 0 = none
    # where each device also keeps its private state on its own disk (simulation: one shared
    # folder, a file per user); with it the ServerApp checkpoints every output.checkpoint_every
    # rounds and a rerun resumes (README "Checkpoints and resuming"); "" = off
    device_state_dir: str = ""


@dataclass
class RayConfig:
    """Resources of one run as a Ray task under `fedrec run --ray` (they do not change results)."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0

    def validate(self):
        _range("ray.num_cpus", self.num_cpus, 0.0, 1024.0)
        _range("ray.num_gpus", self.num_gpus, 0.0, 64.0)


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    flower: FlowerConfig = field(default_factory=FlowerConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    base_dir: str = ""  # directory of the YAML; relative data paths resolve against it

    def validate(self) -> "ExperimentConfig":
        _seed("seed", self.seed)
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if hasattr(v, "validate"):
                v.validate()
        return self

    def to_dict(self) -> dict:
        d = as_dict(self)
        d.pop("base_dir", None)
        return d

    def digest(self) -> str:
        """A short hash of the resolved config (output and Ray resources excluded: they do not
        change results, and run directories keep their names)."""
        d = self.to_dict()
        d.pop("output", None)
        if not d["server"]["filters"]:  # added later: the digests of older runs stay the same
            del d["server"]["filters"]
        del d["flower"]["device_state_dir"]  # where state is kept does not change results
        if d["attack"]["target"] == "none":  # added later: older digests stay the same
            del d["attack"]["target"]
        if d["server"]["step"] == "round":  # added later: older digests stay the same
            del d["server"]["step"]
        if d["train"]["contrastive_dropout"] == 0:  # added later: older digests stay the same
            del d["train"]["contrastive_dropout"]
        if d["attack"]["pool_sample"] == 0:  # added later: older digests stay the same
            del d["attack"]["pool_sample"]
        if d["attack"]["draw_seed"] in (None, d["seed"]):  # added later: older digests stay
            del d["attack"]["draw_seed"]  # the same (and the seed's own draw is the default)
        if d["eval"]["splits"] == ["val", "test"]:
            del d["eval"]["splits"]
        if d["eval"]["from_round"] == 0:  # added later: older digests stay the same
            del d["eval"]["from_round"]
        if d["eval"]["mask_history"] is True:  # added later: older digests stay the same
            del d["eval"]["mask_history"]
        d.pop("ray", None)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]


# ---------------------------------------------------------------------------- validation


def _choice(key, value, choices):
    if value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}")


def _range(key, value, lo, hi):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (lo <= value <= hi):
        raise ConfigError(f"{key}: {value!r} is outside [{lo}, {hi}]")


def _seed(key, value):
    """Seeds feed numpy's SeedSequence: a non-negative integer below 2**63."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
        raise ConfigError(f"{key}: expected an integer in [0, 2**63), got {value!r}")


_ATOMS = (str, int, float, bool, type(None))


def as_dict(obj):
    """dataclasses.asdict(obj), the same dict (key order included), without deep-copying the
    atoms (str, int, float, bool, None): ~2.7x faster on an ExperimentConfig, which matters to
    `fedrec reproduce`'s thousands of configs and digests."""
    if isinstance(obj, _ATOMS):
        return obj
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: as_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a namedtuple, as asdict
        return type(obj)(*[as_dict(v) for v in obj])
    if isinstance(obj, (list, tuple)):
        return type(obj)(as_dict(v) for v in obj)
    if isinstance(obj, dict):
        return type(obj)((as_dict(k), as_dict(v)) for k, v in obj.items())
    import copy

    return copy.deepcopy(obj)


@functools.lru_cache(maxsize=None)
def type_hints(cls) -> dict:
    """typing.get_type_hints(cls), once per class: with postponed annotations each call
    compiles every field's annotation string (~0.5 ms a class; `fedrec reproduce --list`
    built ~2,000 configs and spent half its time here)."""
    return typing.get_type_hints(cls)


@functools.lru_cache(maxsize=None)
def _valid_keys(cls) -> tuple:
    keys = []
    hints = type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name == "base_dir":
            continue
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            keys += [f"{f.name}.{k}" for k in _valid_keys(t)]
        else:
            keys.append(f.name)
    return tuple(keys)


def valid_keys(cls) -> list[str]:
    """Every dotted key a YAML may set, for error messages and the README."""
    return list(_valid_keys(cls))
