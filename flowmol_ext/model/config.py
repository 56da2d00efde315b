"""Hyper-parameters of the FlowMol (CTMC) model: the vector field, the schedules and the loss weights.

:class:`ModelConfig` is what a model directory stores in ``config.yaml`` (section ``model``). The
defaults are the CPU "small" configuration (S=128, V=16, E=64, 4 molecule updates, rbf_dim 32,
n_cp_feats 4, 4 kekulized bond types, a molecule update after every conv). The paper size
(FlowMol v2.0 ``qm9_ctmc``) is :meth:`ModelConfig.paper`, and an official config / Lightning
``hyper_parameters`` dict converts with :meth:`ModelConfig.from_official`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from flowmol_ext.config import ConfigError, StrictModel

FEATURES: tuple[str, ...] = ("x", "a", "c", "e")  # FlowMol's canonical_feat_order
OFFICIAL_ATOM_TYPES: tuple[str, ...] = ("C", "H", "N", "O", "F")

ScheduleType = Literal["linear", "cosine"]


class LossWeights(StrictModel):
    """Weights of the four loss terms: total = x·L_x + a·L_a + c·L_c + e·L_e."""

    x: float = Field(3.0, ge=0)
    a: float = Field(0.4, ge=0)
    c: float = Field(1.0, ge=0)
    e: float = Field(2.0, ge=0)


class ScheduleConfig(StrictModel):
    """Progress schedule α_t per modality. ``linear``: α = t. ``cosine``: α = 1 − cos²(π/2·t^ν)."""

    x: ScheduleType = "linear"
    a: ScheduleType = "linear"
    c: ScheduleType = "linear"
    e: ScheduleType = "linear"


class CosineNu(StrictModel):
    """Exponent ν of the cosine schedule per modality (used only where the schedule is cosine)."""

    x: float = Field(1.0, gt=0)
    a: float = Field(2.0, gt=0)
    c: float = Field(2.0, gt=0)
    e: float = Field(1.5, gt=0)


class GeometryDistortion(StrictModel):
    """FlowMol3's train-time geometry distortion (arXiv 2508.12629; ``distort_p`` / ``distort_t`` upstream).

    While training, in molecules with t > t_min, each atom with probability p has N(0, std²) added to each
    coordinate of its interpolated position x_t (Å) before the network sees it; the target stays x₁, so the model
    learns to pull displaced atoms back (against clashes and distorted bonds at sampling time). p = 0 is off and
    draws no random numbers (the training stream is then that of a model without the option). FlowMol3's
    ``flowmol3.yml`` uses p 0.2 with t 0.5; its released model p 0.7 with t 0.25. Sampling is unaffected.
    """

    p: float = Field(0.0, ge=0.0, le=1.0, description="probability per atom (0 = off)")
    t_min: float = Field(0.5, ge=0.0, le=1.0, description="only molecules with t > t_min are distorted")
    std: float = Field(0.5, gt=0.0, description="standard deviation of the displacement per coordinate, Å")


class ModelConfig(StrictModel):
    """FlowMol CTMC model: GVP vector field sizes, categorical sizes, schedules, loss weights."""

    n_atom_types: int = Field(5, ge=1, description="atom types [C, H, N, O, F]; the mask token is index n_atom_types")
    n_charges: int = Field(6, ge=1, description="formal charges −2..+3; the mask token is index n_charges")
    n_bond_types: int = Field(
        4, ge=2, description="bond classes incl. 'none': 4 kekulized (ours), 5 with aromatic (official)"
    )
    n_hidden_scalars: int = Field(128, ge=1)
    n_vec_channels: int = Field(16, ge=1)
    n_hidden_edge_feats: int = Field(64, ge=1)
    n_molecule_updates: int = Field(4, ge=1)
    convs_per_update: int = Field(1, ge=1)
    n_recycles: int = Field(1, ge=1)
    n_message_gvps: int = Field(3, ge=1)
    n_update_gvps: int = Field(3, ge=1)
    n_cp_feats: int = Field(4, ge=0, description="cross-product vector features per GVP (0 = E(3) GVP)")
    message_norm: float = Field(100.0, gt=0, description="summed messages are divided by this")
    rbf_dmax: float = Field(14.0, gt=0, description="largest RBF centre, Å")
    rbf_dim: int = Field(32, ge=1)
    update_edge_w_distance: bool = True
    separate_mol_updaters: bool = True
    update_after_first_conv: bool = Field(
        True,
        description="False reproduces the official quirk (no molecule update after conv 0, updater 0 dead); "
        "True updates after every convs_per_update convs",
    )
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    cosine_nu: CosineNu = Field(default_factory=CosineNu)
    loss_weights: LossWeights = Field(default_factory=LossWeights)
    distortion: GeometryDistortion = Field(default_factory=GeometryDistortion)

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.n_vec_channels < 3:
            raise ValueError(f"n_vec_channels must be >= 3, got {self.n_vec_channels}")
        return self

    @property
    def n_convs(self) -> int:
        """Number of GVP convolutions = convs_per_update × n_molecule_updates."""
        return self.convs_per_update * self.n_molecule_updates

    @property
    def n_updaters(self) -> int:
        """Number of allocated (position, edge) updater pairs."""
        return self.n_molecule_updates if self.separate_mol_updaters else 1

    @classmethod
    def paper(cls, **overrides: Any) -> ModelConfig:
        """The official FlowMol v2.0 ``qm9_ctmc`` network (6,754,432 parameters with 5 bond types)."""
        base: dict[str, Any] = dict(
            n_bond_types=5, n_hidden_scalars=256, n_vec_channels=16, n_hidden_edge_feats=128,
            n_molecule_updates=8, rbf_dim=32, n_cp_feats=4, update_after_first_conv=False,
        )
        base.update(overrides)
        return cls(**base)

    @classmethod
    def small(cls, **overrides: Any) -> ModelConfig:
        """The CPU default (S=128, V=16, E=64, 4 updates): 982,600 parameters in the official layout."""
        return cls(**overrides)

    @classmethod
    def from_official(cls, cfg: dict[str, Any]) -> ModelConfig:
        """Convert an official FlowMol v2.0 config.

        Accepts either the run's ``config.yaml`` mapping (sections ``vector_field``,
        ``interpolant_scheduler``, ``mol_fm``) or the Lightning ``hyper_parameters`` dict
        (``vector_field_config``, ``interpolant_scheduler_config``, ``total_loss_weights`` ...).
        The result uses the official layout (``update_after_first_conv=False``) and
        ``n_bond_types`` from the config (default 5, the official aromatic-aware data).
        Settings this re-implementation does not support raise :class:`ConfigError` naming the key.
        """
        if not isinstance(cfg, dict):
            raise ConfigError(f"official config must be a mapping, got {type(cfg).__name__}")
        if "vector_field_config" in cfg:  # Lightning hyper_parameters
            vf = dict(cfg["vector_field_config"])
            sched = cfg.get("interpolant_scheduler_config") or {}
            weights = cfg.get("total_loss_weights") or {}
            top = cfg
        elif "vector_field" in cfg:  # config.yaml
            vf = dict(cfg["vector_field"])
            sched = cfg.get("interpolant_scheduler") or {}
            top = dict(cfg.get("mol_fm") or {})
            weights = top.get("total_loss_weights") or {}
            atom_map = (cfg.get("dataset") or {}).get("atom_map")
            if atom_map is not None:
                top["atom_type_map"] = atom_map
        else:
            raise ConfigError(
                "official config has neither 'vector_field_config' (checkpoint hyper_parameters) nor "
                "'vector_field' (config.yaml); keys present: " + ", ".join(sorted(map(str, cfg)))
            )

        param = top.get("parameterization", "ctmc")
        if param != "ctmc":
            raise ConfigError(f"parameterization: only 'ctmc' models are supported, got {param!r}")
        if top.get("time_scaled_loss", False):
            raise ConfigError("time_scaled_loss: true is not supported (qm9_ctmc uses false)")
        if top.get("exclude_charges", False):
            raise ConfigError("exclude_charges: true is not supported")
        atom_map = top.get("atom_type_map")
        if atom_map is not None and tuple(atom_map) != OFFICIAL_ATOM_TYPES:
            raise ConfigError(f"atom_type_map must be {list(OFFICIAL_ATOM_TYPES)}, got {list(atom_map)}")
        if isinstance(vf.get("message_norm", 100), str):
            raise ConfigError(f"vector_field.message_norm: only numbers are supported, got {vf['message_norm']!r}")

        known = {
            "n_hidden_scalars", "n_vec_channels", "n_hidden_edge_feats", "n_molecule_updates", "convs_per_update",
            "n_recycles", "n_message_gvps", "n_update_gvps", "n_cp_feats", "message_norm", "rbf_dmax", "rbf_dim",
            "update_edge_w_distance", "separate_mol_updaters",
        }
        sampling_only = {"stochasticity", "high_confidence_threshold"}
        unknown = set(vf) - known - sampling_only
        if unknown:
            raise ConfigError(f"unsupported official vector_field keys: {sorted(unknown)}")
        kw: dict[str, Any] = {k: vf[k] for k in known if k in vf}
        kw["n_bond_types"] = int(top.get("n_bond_types", 5))
        kw["n_charges"] = int(top.get("n_atom_charges", 6))
        kw["update_after_first_conv"] = False
        stypes = sched.get("schedule_type") or {}
        kw["schedule"] = {f: stypes.get(f, "linear") for f in FEATURES}
        nus = sched.get("cosine_params") or {}
        kw["cosine_nu"] = {f: float(nus[f]) for f in FEATURES if f in nus}
        kw["loss_weights"] = {f: float(weights[f]) for f in FEATURES if f in weights}
        try:
            return cls(**kw)
        except Exception as err:  # pydantic ValidationError -> readable ConfigError
            raise ConfigError(f"official config does not convert to ModelConfig: {err}") from None
