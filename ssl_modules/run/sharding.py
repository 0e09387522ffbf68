"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for every method, through Lightning's ``ModelParallelStrategy``.

What is sharded (``docs/fsdp2.md``): every top-level part of the module that holds parameters (the student
backbone, the heads) and every copy of the EMA teacher. A backbone is sharded per repeated layer (a ViT's
blocks, a ResNet's or ConvNeXt's stages) and then as a whole, so that one layer's parameters are gathered at
a time; a head is sharded as one unit. A teacher copy gets exactly the layout of the student part it copies,
so that the EMA update ``torch._foreach_lerp_(teacher, student, 1 - m)`` pairs equal local shards.

FSDP2 and not FSDP1: FSDP1 asserts on a second forward of a wrapped module in one step, and every method here
runs the backbone on several crops (https://pytorch.org/docs/stable/distributed.fsdp.fully_shard.html).

:class:`FSDP2Strategy` is ``ModelParallelStrategy`` whose ``"auto"`` sizes mean pure data parallelism: every
process a data-parallel replica (its own images, as under DDP) holding 1/world of the parameters.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from datetime import timedelta
from typing import Any, Literal

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor, nn

__all__ = ["FSDP2Strategy", "data_parallel_mesh", "full_state_dict", "full_tensor", "gather_for_export", "gathered",
           "is_sharded", "repeated_layers", "shard_module", "shard_parts", "sharded_units"]

_LAYER_LISTS = ("blocks", "stages", "layers")  # timm's ViT/EVA/Swin blocks, ConvNeXt/RegNet stages, ...
_RESNET_STAGES = ("layer1", "layer2", "layer3", "layer4")


class FSDP2Strategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` for data-parallel FSDP2: ``"auto"`` gives ``data_parallel_size`` = every
    process of the run and ``tensor_parallel_size=1`` (Lightning's own ``"auto"`` means tensor parallelism
    within a node, where the processes of a node read the same images).

    Args:
        save_distributed_checkpoint: ``True`` (default) saves a checkpoint folder, one shard file per process
            (Lightning's distributed checkpoint); ``False`` gathers the full state on rank 0 into one file.
        process_group_backend: ``"nccl"`` on GPUs by default, ``"gloo"`` on CPUs.
        timeout: of the collectives.
    """

    def __init__(self, save_distributed_checkpoint: bool = True, process_group_backend: str | None = None,
                 timeout: timedelta | None = None, data_parallel_size: Literal["auto"] | int = "auto",
                 tensor_parallel_size: Literal["auto"] | int = "auto") -> None:
        extra: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
        super().__init__(data_parallel_size=data_parallel_size, tensor_parallel_size=tensor_parallel_size,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend, **extra)
        self._layer_sync: Any = None  # the Trainer's sync_batchnorm plugin (ModelParallelStrategy ignores it)

    def setup_environment(self) -> None:
        """The data-parallel mesh; then, for ``Trainer(sync_batchnorm=True)`` during fit, BatchNorm layers
        turned into ``SyncBatchNorm`` before ``configure_model`` shards the module (as DDP does)."""
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        if self._tensor_parallel_size == "auto":
            self._tensor_parallel_size = 1
        super().setup_environment()
        module = self.lightning_module
        fitting = module is not None and module._trainer is not None and module.trainer.state.fn == TrainerFn.FITTING
        if self._layer_sync is not None and fitting:
            self._layer_sync.apply(module)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Lightning's loading of a distributed checkpoint folder, except that the optimizer state of a parameter
        that had none when the checkpoint was written (it had not yet received a gradient: CrIBo's and BAM's
        prototype layers frozen in the first epoch) is left out instead of required, so that the resumed run
        gives that parameter its first optimizer step exactly when the uninterrupted run does."""
        from pathlib import Path

        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict, set_optimizer_state_dict)

        path = Path(self.broadcast(checkpoint_path))
        if not (path.is_dir() and (path / ".metadata").is_file()):
            return super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        assert self.model is not None
        saved = set(dcp.FileSystemReader(path).read_metadata().state_dict_metadata)
        model_state = {"state_dict": get_model_state_dict(self.model)}
        dcp.load(model_state, checkpoint_id=path)
        self.model.load_state_dict(model_state["state_dict"], strict=self.lightning_module.strict_loading)
        for index, optimizer in enumerate(self.optimizers):
            key = f"optimizer_{index}"
            state = get_optimizer_state_dict(self.model, optimizer)  # every parameter's state, initialised
            state["state"] = {name: value for name, value in state["state"].items()
                              if any(f"{key}.state.{name}.{entry}" in saved for entry in value)}
            loaded = {key: state}
            dcp.load(loaded, checkpoint_id=path)
            set_optimizer_state_dict(self.model, optimizer, optim_state_dict=loaded[key],
                                     options=StateDictOptions(strict=False))
            names = {id(parameter): name for name, parameter in self.model.named_parameters()}
            for parameter in list(optimizer.state):  # without a saved state: none, as in the uninterrupted run
                if names.get(id(parameter)) not in state["state"]:
                    del optimizer.state[parameter]
        return torch.load(path / "meta.pt", weights_only=weights_only)  # as Lightning reads it

    def on_train_start(self) -> None:
        super().on_train_start()
        backbone = self._embedding_backbone()
        if backbone is not None:
            backbone.gathered_export_state = None  # the weights move again

    def on_train_end(self) -> None:
        """Gather the embedding backbone (the teacher's, where there is one) on every process at the end of
        training (:func:`gather_for_export`), so that its export, which rank 0 alone writes (e.g.
        ``python -m ssl_modules fit``), holds plain whole tensors."""
        super().on_train_end()
        backbone = self._embedding_backbone()
        if backbone is not None:
            gather_for_export(backbone)

    def _embedding_backbone(self) -> nn.Module | None:
        backbone = getattr(self.lightning_module, "embedding_backbone", None)
        return backbone if isinstance(backbone, nn.Module) else None


@torch.no_grad()
def gather_for_export(backbone: nn.Module) -> None:
    """Keep a plain CPU copy of a sharded backbone's export state in ``backbone.gathered_export_state`` (a
    collective: every process calls it). ``export_backbone`` writes that copy when one process alone exports
    (``ssl_modules.checkpoints.export``). The state is ``backbone.timm_state_dict()`` (timm's names) where the
    backbone has it, else its ``state_dict()``."""
    state_of = getattr(backbone, "timm_state_dict", backbone.state_dict)
    backbone.gathered_export_state = {name: full_tensor(value).detach().cpu() for name, value in state_of().items()}


def data_parallel_mesh(mesh: Any) -> Any:
    """The one-dimensional data-parallel mesh FSDP2 shards over, from the strategy's device mesh.

    Tensor parallelism is not supported (the methods have no parallelised layers): a mesh with a
    ``tensor_parallel`` dimension larger than 1 is refused with the setting to use instead.
    """
    names = tuple(mesh.mesh_dim_names or ())
    if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
        raise ValueError(
            f"FSDP2 here shards data-parallel replicas only, but the device mesh has tensor_parallel size "
            f"{mesh['tensor_parallel'].size()} (ModelParallelStrategy's 'auto' puts a node's processes in tensor "
            "parallelism, where they read the same images). Use strategy ssl_modules.run.sharding.FSDP2Strategy, "
            "or ModelParallelStrategy(data_parallel_size=<number of processes>, tensor_parallel_size=1)")
    if "data_parallel" in names and len(names) > 1:
        return mesh["data_parallel"]
    return mesh


def repeated_layers(module: nn.Module) -> list[nn.Module]:
    """The repeated layers of a backbone, sharded one by one: a ``blocks``/``stages``/``layers`` list (ViTs,
    ConvNeXts, ...) or ResNet's ``layer1``..``layer4``, looked for in the module and its ``model``; none for
    a head."""
    for owner in (module, getattr(module, "model", None)):
        if not isinstance(owner, nn.Module):
            continue
        for name in _LAYER_LISTS:
            layers = getattr(owner, name, None)
            if isinstance(layers, (nn.ModuleList, nn.Sequential)) and len(layers) > 0:
                return list(layers)
        stages = [getattr(owner, name) for name in _RESNET_STAGES if isinstance(getattr(owner, name, None), nn.Module)]
        if stages:
            return stages
    return []


def shard_module(module: nn.Module, mesh: Any) -> nn.Module:
    """``fully_shard`` each repeated layer of a backbone (:func:`repeated_layers`), or each child holding
    parameters of a head, then ``module`` itself.

    A head's children are units of their own so that a head method other than ``forward`` (CrIBo's
    ``head.objects``: the trunk, then the object prototypes) still gathers its parameters: FSDP2 gathers in
    the forward of a sharded module only. Every unit reshards after its forward (also the top one, whose
    FSDP2 default keeps it gathered until a backward that a teacher never runs), so that outside a forward
    every parameter is a sharded DTensor and the EMA update pairs shards."""
    from torch.distributed.fsdp import fully_shard

    units = repeated_layers(module) or [child for child in module.children() if _has_parameters(child)]
    for unit in units:
        fully_shard(unit, mesh=mesh, reshard_after_forward=True)
    fully_shard(module, mesh=mesh, reshard_after_forward=True)
    return module


def _has_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def shard_parts(root: nn.Module, mesh: Any, skip: Iterable[str] = ()) -> list[str]:
    """Shard every top-level child of ``root`` that holds parameters; a ``ModuleDict`` child (the EMA teacher)
    has each of its entries sharded on its own. Parameters held by ``root`` directly are refused (FSDP2 needs
    them in a module). Returns the qualified names of the sharded modules, in order.

    Sharding is deterministic in the module order, so a teacher copy (a deep copy of a student part) gets the
    layout of the part it copies."""
    own = [name for name, _ in root.named_parameters(recurse=False)]
    if own:
        raise ValueError(f"{type(root).__name__} holds parameters {own} outside any submodule: FSDP2 shards "
                         "modules, so put them in a submodule (e.g. an nn.ParameterDict child)")
    skipped, sharded = set(skip), []
    for name, child in root.named_children():
        if name in skipped or not _has_parameters(child):
            continue
        if isinstance(child, nn.ModuleDict):
            for key, entry in child.items():
                if _has_parameters(entry):
                    shard_module(entry, mesh)
                    sharded.append(f"{name}.{key}")
        else:
            shard_module(child, mesh)
            sharded.append(name)
    return sharded


def sharded_units(module: nn.Module) -> list[nn.Module]:
    """The FSDP2 units in ``module`` (itself included), in module order; empty for a module not sharded."""
    from torch.distributed.fsdp import FSDPModule

    return [unit for unit in module.modules() if isinstance(unit, FSDPModule)]


@contextlib.contextmanager
def gathered(module: nn.Module) -> Iterator[None]:
    """Gather every FSDP2 unit of ``module`` (a collective: every process enters together) and keep it gathered
    for the block, so that forwards inside it issue no collective and may differ in number between processes
    (a probe's uneven shards of batches, pictures drawn on rank 0 only). Afterwards every unit is sharded again.
    A module that is not sharded is left as it is."""
    units = sharded_units(module)
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.set_reshard_after_forward(True, recurse=False)
            unit.reshard()


def is_sharded(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a DTensor (a parameter or gradient of an FSDP2 module)."""
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def full_tensor(tensor: Tensor) -> Tensor:
    """The whole tensor of a DTensor (a collective: every process must call it), else ``tensor`` itself."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


@torch.no_grad()
def full_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """``module.state_dict()`` with every DTensor gathered into a plain CPU tensor (a collective)."""
    return {name: full_tensor(value).detach().cpu() if isinstance(value, Tensor) else value
            for name, value in module.state_dict().items()}
