"""VICRegL (Bardes, Ponce, LeCun, NeurIPS 2022): VICReg on pooled features and on matched feature-map cells.

One network, no teacher, no stop-gradient. Per step: encode every view -> global expander on the pooled
vector and local projector on every cell -> seed-image location of every cell -> VICReg on the global
embeddings, and on cells paired by location and by embedding distance -> ``alpha * global + (1 - alpha) *
local``. Follows the official code (``docs/vicregl.md``) where it differs from the paper.
"""
from __future__ import annotations

import warnings
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ssl_modules.contracts import Views
from ssl_modules.run import distributed
from ssl_modules.networks.backbones import Backbone, Features
from ssl_modules.methods.base import SSLModule
from ssl_modules.functional import vicregl_loss
from ssl_modules.networks.heads import MLP, LocalProjector
from ssl_modules.methods.local_matching import all_cell_locations, match_cells
from ssl_modules.methods.multicrop import encode_views
from ssl_modules.methods._ranges import check_ranges

__all__ = ["VICRegL"]


def _has_batchnorm(*modules: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for module in modules for m in module.modules())


class VICRegL(SSLModule):
    """VICRegL as a LightningModule.

    Args:
        backbone: timm model name (``resnet50``, ``convnext_small``, ``convnext_base``; any timm CNN, and
            ViTs through their patch tokens).
        alpha: weight of the global criterion; ``1 - alpha`` weighs the local one (0.75 and 0.9 released).
        num_matches: ``(gamma1, gamma2)``: location matches kept when a large view's cells query the other
            view, and in the reverse direction.
        filter_feature_matches: also keep only ``num_matches`` feature matches (the paper); the official
            code keeps every cell (False).
        flip_aware_locations: mirror the cell locations of flipped crops (the paper); the official training
            ignores flips (False).
        inv_coeff: invariance coefficient. var_coeff: variance coefficient. cov_coeff: covariance coefficient.
        eps: epsilon inside the variance's square root.
        expander_widths: global expander widths, ``"8192-8192-8192"``.
        projector_widths: local projector widths, ``"512-512-512"``.
        head_norm: norm of both heads: ``"auto"`` (BatchNorm for BatchNorm backbones, LayerNorm otherwise,
            as the official ResNet / ConvNeXt), ``"batch"`` or ``"layer"``.
        concat_views: encode views of one resolution in one backbone call. ``None`` (auto): only when
            nothing has BatchNorm; the official code forwards every view separately, and with BatchNorm
            grouping changes the statistics.
        official_backbone: build ConvNeXts as the official code does: no layer scale, drop path 0.1 (unless
            given), LayerNorm on every cell then the mean as the global feature.
        **kwargs: :class:`~ssl_modules.SSLModule` arguments (backbone_kwargs, optimizer, lr, ...). The
            defaults are the official ConvNeXt recipe: AdamW, base lr 5e-4 per 256 images, weight decay
            0.05 constant (``weight_decay=None``: 0.05, or 1e-6 with LARS, as the official LARS), 10 warm-up
            epochs (``peak * step / warmup_steps``, official), final lr 0.001 x peak. Use
            ``optimizer="lars", lr=0.2`` for ResNet-50.
    """

    lr_warmup = "fraction"

    def __init__(
        self,
        backbone: str = "convnext_small",
        alpha: float = 0.75,
        num_matches: tuple[int, int] = (20, 4),
        filter_feature_matches: bool = False,
        flip_aware_locations: bool = False,
        inv_coeff: float = 25.0,
        var_coeff: float = 25.0,
        cov_coeff: float = 1.0,
        eps: float = 1e-4,
        expander_widths: str = "8192-8192-8192",
        projector_widths: str = "512-512-512",
        head_norm: Literal["auto", "batch", "layer"] = "auto",
        concat_views: bool | None = None,
        official_backbone: bool = True,
        optimizer: Literal["adamw", "sgd", "lars"] = "adamw",
        lr: float = 5e-4,
        min_lr_ratio: float | None = 1e-3,
        weight_decay: float | None = None,
        **kwargs: Any,
    ) -> None:
        check_ranges(type(self), [
            ("alpha", alpha, "in [0, 1]"), ("inv_coeff", inv_coeff, ">= 0"), ("var_coeff", var_coeff, ">= 0"),
            ("cov_coeff", cov_coeff, ">= 0"), ("eps", eps, "> 0"),
        ])
        if weight_decay is None:  # official: LARS always uses 1e-6, AdamW the --weight-decay default 0.05
            weight_decay = 1e-6 if optimizer == "lars" else 0.05
        if len(num_matches) != 2 or min(num_matches) < 1:
            raise ValueError(f"num_matches must be two positive ints (gamma1, gamma2), got {num_matches}")
        super().__init__(backbone=backbone, optimizer=optimizer, lr=lr, min_lr_ratio=min_lr_ratio,
                         weight_decay=weight_decay, **kwargs)
        self.hparams["weight_decay"] = weight_decay  # the resolved value (the CLI records the given None)
        width = self.backbone.num_features
        norm = ("batch" if self.backbone.has_batchnorm else "layer") if head_norm == "auto" else head_norm
        self.expander = MLP(width, expander_widths, norm=norm, last_bias=False) if alpha > 0 else None
        self.projector = LocalProjector(width, projector_widths, norm=norm, last_bias=False) if alpha < 1 else None
        heads = [m for m in (self.expander, self.projector) if m is not None]
        self.concat_views = (not _has_batchnorm(self.backbone, *heads)) if concat_views is None else concat_views

    def build_backbone(self, name: str, kwargs: dict[str, Any]) -> Backbone:
        if self.hparams.official_backbone and name.startswith("convnext"):
            kwargs.setdefault("global_pool", "cell_norm_mean")
            kwargs.setdefault("layer_scale", False)
            kwargs.setdefault("drop_path_rate", 0.1)
        return Backbone(name, **kwargs)

    # -------------------------------------------------------------------------------------- checks
    def on_fit_start(self) -> None:
        super().on_fit_start()
        if distributed.world_size() > 1 and _has_batchnorm(self) and not any(
            isinstance(m, nn.SyncBatchNorm) for m in self.modules()
        ):
            warnings.warn(
                "VICRegL has BatchNorm layers but they are not synchronised across processes: the official "
                "recipe uses SyncBatchNorm; pass Trainer(sync_batchnorm=True)", stacklevel=2,
            )

    def _check_batch(self, views) -> None:
        if views.num_views < 2:
            raise ValueError(f"VICRegL needs at least 2 views per image, got {views.num_views}")
        if views.batch_size * distributed.world_size() < 2:
            raise ValueError(
                "VICRegL's variance term needs at least 2 images in the global batch; got a batch of 1 on "
                "one process: raise the batch size"
            )

    def _check_grids(self, feats: list[Features], views) -> None:
        if self.projector is None:
            return
        for v, f in enumerate(feats):
            if f.grid[0] * f.grid[1] < 2:
                size = tuple(views.crops[v].shape[-2:])
                raise ValueError(
                    f"view {v} ({size[0]}x{size[1]} px) gives a {f.grid[0]}x{f.grid[1]} feature map with the "
                    f"stride-{self.backbone.stride} backbone: local matching needs at least 2 cells; use crops of "
                    f"at least {2 * self.backbone.stride} px or alpha=1"
                )

    # ---------------------------------------------------------------------------------------- step
    def training_step(self, views: Views, batch_idx: int) -> dict[str, Tensor]:
        self._check_batch(views)
        feats = encode_views(self.forward, views.crops, per_view=not self.concat_views)
        self._check_grids(feats, views)
        embeddings = [self.expander(f.global_) for f in feats] if self.expander is not None else None
        maps = [self.projector(f.dense) for f in feats] if self.projector is not None else None
        locations = None
        if maps is not None:
            locations = all_cell_locations(views, [f.grid for f in feats], self.hparams.flip_aware_locations)
        out = self.criterion(embeddings, maps, locations)
        self.log_terms(out)
        return {"loss": out["loss"], "embedding": feats[0].global_.detach()}

    def criterion(self, embeddings: list[Tensor] | None, maps: list[Tensor] | None,
                  locations: list[Tensor] | None) -> dict[str, Tensor]:
        """The VICRegL loss on the global batch (gathered with gradients across processes)."""
        hp = self.hparams
        return vicregl_loss(
            embeddings, maps, locations, alpha=hp.alpha,
            num_matches=tuple(hp.num_matches), filter_feature_matches=hp.filter_feature_matches,
            inv_coeff=hp.inv_coeff, var_coeff=hp.var_coeff, cov_coeff=hp.cov_coeff, eps=hp.eps,
            gather=distributed.all_gather_with_grad,
        )

    # --------------------------------------------------------------------------------- diagnostics
    @torch.no_grad()
    def diagnostic_matches(self, views: Views) -> dict[str, Any]:
        """The matches of the first image's two large views that the diagnostics draw: the location matches
        (the ``num_matches[0]`` closest cell pairs in the seed image, fixed by the crops) and the learned
        feature matches (the ``num_matches[0]`` closest pairs of local embeddings), each as cell indices
        ``(query, candidate)``, with whether each feature match lands within one cell of where the geometry
        puts its query."""
        from ssl_modules.functional import match_by_features

        sub = views.select(0, views=slice(0, 2))
        with self.evaluating():
            feats = [self.forward(crop) for crop in sub.crops]
            embeddings = [self.projector(f.dense) for f in feats]
        grids = [f.grid for f in feats]
        locations = all_cell_locations(sub, grids, self.hparams.flip_aware_locations)
        gamma = min(self.hparams.num_matches[0], locations[0].shape[1], locations[1].shape[1])
        by_location = match_cells(locations[0], locations[1], gamma)
        by_feature = match_by_features(embeddings[0], embeddings[1], gamma)
        query, matched = by_feature["query_index"][0], by_feature["candidate_index"][0]
        # Agreement: the matched cell lies within one cell (of the candidate view) of the query's location.
        cell_size = (sub.pixel_boxes()[0, 1, 2:] - sub.pixel_boxes()[0, 1, :2]) / torch.tensor(grids[1])
        offset = (locations[1][0, matched] - locations[0][0, query]).abs() / cell_size.to(locations[0])
        return {"crops": sub.crops, "grids": grids,
                "location": (by_location["query_index"][0], by_location["candidate_index"][0]),
                "feature": (query, matched), "agrees": (offset <= 1.0).all(dim=-1)}

    @torch.no_grad()
    def visual_diagnostics(self, views: Views) -> dict[str, Tensor]:
        """``vicregl/matches``: the first image's two large views with their feature cells outlined; top, the
        location matches (geometry: nothing learned); below, the learned feature matches, green where they
        agree with the geometry and red where not."""
        from ssl_modules.drawing import denormalize, match_panels, with_caption

        if self.projector is None:
            return {}
        m = self.diagnostic_matches(views)
        agree = float(m["agrees"].float().mean())
        picture = match_panels(denormalize(m["crops"][0][0]), denormalize(m["crops"][1][0]), *m["grids"], [
            ("location matches (from the crop geometry)", *m["location"], None),
            ("feature matches (nearest local embeddings)", *m["feature"], m["agrees"]),
        ])
        caption = [f"VICRegL matches at step {self.global_step}: view 1 (left) and view 2 (right) of one image, "
                   f"{len(m['feature'][0])} matches each",
                   f"{agree:.0%} of the feature matches lie within one cell of the geometric location"]
        return {"vicregl/matches": with_caption(picture, caption)}
