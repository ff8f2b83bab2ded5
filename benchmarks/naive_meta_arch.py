"""The naive training forward the efficiency measurements compare against (not a choice dinolab offers).

:class:`IBOTStyleMetaArch` computes the same losses as :class:`dinolab.train.meta_arch.SSLMetaArch` the way the
iBOT code does (``main_ibot.py``, ``models/head.py``): the heads run on every token of every crop (the local crops'
patch logits are computed and dropped; the teacher's for every patch, selected after), and the iBOT loss is dense
over all patches of the global crops, the unmasked ones weighted 0. ``benchmarks/train_step.py --baseline`` times
it; ``tests/train/test_meta_arch.py`` checks that every technique of the library's forward leaves its losses and
gradients unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dinolab.data.collate import Batch
from dinolab.losses import ibot_loss
from dinolab.train.meta_arch import SSLMetaArch


class IBOTStyleMetaArch(SSLMetaArch):
    """:class:`SSLMetaArch` with the heads on all patches and a dense iBOT loss (same values, more work)."""

    def _masked_patch_logits(self, net: nn.ModuleDict, cls_tokens: Tensor, patches: Tensor, batch: Batch):
        cls_logits, all_logits = self._heads(net, cls_tokens, patches.flatten(0, 1))  # [n, K], [G*B*N, K]
        return cls_logits, all_logits.index_select(0, batch.mask_indices)

    def _student_losses(
        self,
        batch: Batch,
        outs: list[dict[str, Tensor]],
        cls_tokens: Tensor,
        patches: Tensor,
        dino_targets: Tensor,
        ibot_targets: Tensor,
    ) -> tuple[Tensor, Tensor]:
        cls_logits, patch_logits = [], []
        for out in outs:
            cls, patch = self._heads(self.student, out["x_norm_clstoken"], out["x_norm_patchtokens"].flatten(0, 1))
            cls_logits.append(cls)
            patch_logits.append(patch)
        global_patch_logits = patch_logits[0]  # [G*B*N, K]
        del patch_logits
        with torch.autocast(global_patch_logits.device.type, enabled=False):
            cls_logits = torch.cat(cls_logits).float()
            dino = self.dino_loss(cls_logits.view(-1, batch.num_images, cls_logits.shape[-1]), dino_targets.float())
            ibot = dino.new_zeros(())
            if self.loss_config.ibot_weight > 0 and batch.mask_indices.numel():
                rows = batch.mask_indices
                dense_targets = ibot_targets.new_zeros(global_patch_logits.shape).index_copy_(0, rows, ibot_targets)
                dense_weights = batch.mask_weights.new_zeros(dense_targets.shape[0]).index_copy_(
                    0, rows, batch.mask_weights
                )
                ibot = ibot_loss(
                    global_patch_logits.float(),
                    dense_targets,
                    dense_weights,
                    num_images=batch.global_crops.shape[0],
                    student_temp=self.loss_config.student_temp,
                )
        return dino, ibot
