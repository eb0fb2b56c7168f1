"""Finetuning: train the classifier head alone, for the whole run or until a given epoch, then everything."""

import lightning as L
from lightning.pytorch.callbacks import BaseFinetuning
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.optim import Optimizer

from imgcls.backbones.factory import head_names
from imgcls.compat.lightning import finds_unused_parameters
from imgcls.errors import UserError


def backbone_modules(net: nn.Module) -> list[nn.Module]:
    """Every module of ``net`` outside its classifier head (``imgcls.backbones.head_names``)."""
    head = {id(module) for name in head_names(net) for module in net.get_submodule(name).modules()}
    return [module for module in net.modules() if id(module) not in head]


def backbone_parameters(net: nn.Module) -> list[nn.Parameter]:
    """The parameters of ``net`` outside its classifier head."""
    return [param for module in backbone_modules(net) for param in module.parameters(recurse=False)]


def freeze_backbone(net: nn.Module) -> None:
    """Stop training all but the head; BatchNorm layers stop updating their running statistics too."""
    for module in backbone_modules(net):
        BaseFinetuning.freeze_module(module)  # this module's own parameters only: the head may sit inside it


class UnfreezeBackbone(BaseFinetuning):
    """Train only the classifier head until epoch ``unfreeze_at_epoch`` (counted from 0), then the whole network.

    While frozen, the backbone's parameters and BatchNorm statistics stay as loaded. The backbone's parameters
    stay in the optimizer throughout, in the group ``backbone_lr_scale`` sets; they get no gradients while frozen,
    so the optimizer leaves them alone. Add it to ``trainer.callbacks``, as ``configs/finetune.yaml`` does.
    """

    def __init__(self, unfreeze_at_epoch: int = 1) -> None:
        super().__init__()
        self.unfreeze_at_epoch = unfreeze_at_epoch

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        # DDP waits for a gradient of every parameter it wrapped, and a frozen backbone gives none.
        if isinstance(trainer.strategy, DDPStrategy) and not finds_unused_parameters(trainer.strategy):
            raise UserError(
                "imgcls.backbones.finetuning.UnfreezeBackbone under DDP needs "
                "--trainer.strategy=ddp_find_unused_parameters_true"
            )

    def freeze_before_training(self, pl_module: L.LightningModule) -> None:
        """Nothing yet: Lightning calls this in ``setup``, before ``configure_model`` builds the network."""

    def finetune_function(self, pl_module: L.LightningModule, epoch: int, optimizer: Optimizer) -> None:
        # Decided afresh at each epoch start, so a run resumed after the unfreezing epoch trains everything.
        if epoch < self.unfreeze_at_epoch:
            freeze_backbone(pl_module.net)
        else:
            self.make_trainable(backbone_modules(pl_module.net))
