"""The original iBOT training step, built at run time from a checkout of github.com/bytedance/ibot (read at da316d8),
for ``benchmarks/step_time.py --original PATH``. None of its code is copied here: the models, the head, the loss,
the parameter groups, the clipping, the last-layer freeze and the schedules are imported from the checkout.

What this module writes itself is the per-iteration body of its ``train_one_epoch`` (main_ibot.py, the loop body
from "update weight decay and learning rate" to the metric logger), step by step in the same order with the same
host syncs: ``loss.item()`` before the update, the all-gathered teacher/student argmax, per-parameter ``.item()``
clipping, the per-parameter EMA loop, ``torch.cuda.synchronize()`` and the logged ``.item()`` values. It leaves out
only what is not per step: the DataLoader, the MetricLogger's printing and the NMI evaluation at the epoch's end.

Its step runs on the same crops and masks as ours, in its own default precision (``--use_fp16 true``: fp16 autocast
and a GradScaler on a GPU; fp32 on a CPU), with a one-process ``torch.distributed`` group (it wraps the student in
DistributedDataParallel and all-reduces its centres). ``.cuda()`` becomes ``.to(device)`` so it also runs on a CPU.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import types
from functools import partial

import torch
import torch.distributed as dist
from torch import nn

#: What main_ibot.py imports at the top for its logging and its epoch-end evaluation only, which this step never
#: calls; stand-ins are put in sys.modules where the real module is not installed (the GPU image has no tensorboardX).
_LOGGING_ONLY = ("tensorboardX", "munkres", "evaluation.unsupervised.unsup_cls")


def _import_checkout(path: str) -> types.SimpleNamespace:
    path = os.path.abspath(path)
    if not os.path.exists(os.path.join(path, "main_ibot.py")):
        raise FileNotFoundError(f"{path} is not a checkout of github.com/bytedance/ibot (no main_ibot.py)")
    for name in _LOGGING_ONLY:
        try:
            __import__(name)
        except Exception:  # noqa: BLE001 - absent or broken: this step does not use it
            stub = types.ModuleType(name)
            stub.SummaryWriter = stub.Munkres = None
            stub.eval_pred = None
            sys.modules[name] = stub
    sys.path.insert(0, path)
    try:
        import main_ibot
        import models
        import utils
        from models.head import iBOTHead
    finally:
        sys.path.remove(path)
    return types.SimpleNamespace(main=main_ibot, models=models, utils=utils, iBOTHead=iBOTHead)


def _process_group(device: torch.device) -> None:
    if dist.is_initialized():
        return
    store = os.path.join(tempfile.mkdtemp(prefix="ibot_original_"), "store")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"file://{store}", rank=0,
                            world_size=1)


class OriginalStep:
    """The original code's student, teacher, loss, optimiser and schedules for ``cfg`` (our config's model, head,
    crops and optimiser values mapped onto its arguments); ``step(images, masks)`` runs one iteration of its loop."""

    def __init__(self, checkout: str, cfg, device: torch.device, *, steps: int = 1000) -> None:
        ib = self.ib = _import_checkout(checkout)
        self.device = device
        _process_group(device)
        self.cfg = cfg
        m, h, c, o, lo = cfg.model, cfg.head, cfg.crops, cfg.optim, cfg.loss
        if m.stem != "patch":
            raise ValueError("the original iBOT code has only the linear patch stem: use --set model.stem=patch")
        import timm

        ref = timm.create_model(m.arch, pretrained=False, num_classes=0)  # the width/depth/heads of our arch
        width, depth, heads = m.embed_dim or ref.embed_dim, m.depth or len(ref.blocks), m.num_heads or ref.blocks[
            0].attn.num_heads
        vit = partial(ib.models.VisionTransformer, patch_size=cfg.patch_size, embed_dim=width, depth=depth,
                      num_heads=heads, mlp_ratio=4, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6),
                      img_size=[c.global_crops_size], return_all_tokens=True)
        student = vit(drop_path_rate=m.drop_path_rate, masked_im_modeling=True)
        teacher = vit()
        student = ib.utils.MultiCropWrapper(student, ib.iBOTHead(
            width, h.out_dim, patch_out_dim=h.patch_out_dim, norm=None, act="gelu", norm_last_layer=h.norm_last_layer,
            shared_head=h.shared_head, hidden_dim=h.hidden_dim, bottleneck_dim=h.bottleneck_dim, nlayers=h.nlayers))
        teacher = ib.utils.MultiCropWrapper(teacher, ib.iBOTHead(
            width, h.out_dim, patch_out_dim=h.patch_out_dim, norm=None, act="gelu", shared_head=h.shared_head_teacher,
            hidden_dim=h.hidden_dim, bottleneck_dim=h.bottleneck_dim, nlayers=h.nlayers))
        student, teacher = student.to(device), teacher.to(device)
        self.student = nn.parallel.DistributedDataParallel(
            student, device_ids=[device.index or 0] if device.type == "cuda" else None)
        self.teacher = teacher
        teacher.load_state_dict(self.student.module.state_dict(), strict=False)
        for p in teacher.parameters():
            p.requires_grad = False
        same_dim = h.shared_head or h.shared_head_teacher
        self.loss = ib.main.iBOTLoss(
            h.out_dim, h.out_dim if same_dim else h.patch_out_dim, c.global_crops_number, c.local_crops_number,
            lo.warmup_teacher_temp, lo.teacher_temp, lo.warmup_teacher_patch_temp, lo.teacher_patch_temp,
            lo.warmup_teacher_temp_epochs, max(o.epochs, lo.warmup_teacher_temp_epochs + 1),
            lambda1=lo.lambda_cls, lambda2=lo.lambda_mim, mim_start_epoch=cfg.masking.start_epoch).to(device)
        self.optimizer = torch.optim.AdamW(ib.utils.get_params_groups(self.student))
        self.fp16_scaler = torch.cuda.amp.GradScaler() if device.type == "cuda" else None  # its --use_fp16 true
        peak_lr = o.lr * o.batch_size / 256.0
        self.lr_schedule = ib.utils.cosine_scheduler(peak_lr, o.min_lr, 1, steps, warmup_epochs=0)
        self.wd_schedule = ib.utils.cosine_scheduler(o.weight_decay, o.weight_decay_end, 1, steps)
        self.momentum_schedule = ib.utils.cosine_scheduler(
            o.momentum_teacher if isinstance(o.momentum_teacher, float) else 0.996, 1, 1, steps)
        names_q = dict(self.student.module.named_parameters())
        names_k = dict(teacher.named_parameters())
        common = [n for n in names_q if n in names_k]
        self.params_q = [names_q[n] for n in common]
        self.params_k = [names_k[n] for n in common]
        self.it = 0
        self.args = types.SimpleNamespace(global_crops_number=c.global_crops_number, clip_grad=o.clip_grad,
                                          freeze_last_layer=o.freeze_last_layer, use_masked_im_modeling=True)

    def step(self, images: list[torch.Tensor], masks: list[torch.Tensor]) -> float:
        """One iteration of train_one_epoch on ``images`` (12 float crops on the host) and ``masks`` (bool (B, h, w)
        per crop), epoch 0."""
        args, student, teacher, utils = self.args, self.student, self.teacher, self.ib.utils
        it, epoch = self.it % len(self.lr_schedule), 0
        self.it += 1
        for i, param_group in enumerate(self.optimizer.param_groups):
            param_group["lr"] = self.lr_schedule[it]
            if i == 0:
                param_group["weight_decay"] = self.wd_schedule[it]
        images = [im.to(self.device, non_blocking=True) for im in images]
        masks = [msk.to(self.device, non_blocking=True) for msk in masks]
        g = args.global_crops_number
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.fp16_scaler is not None):
            teacher_output = teacher(images[:g])
            student_output = student(images[:g], mask=masks[:g])
            student.module.backbone.masked_im_modeling = False
            student_local_cls = student(images[g:])[0] if len(images) > g else None
            student.module.backbone.masked_im_modeling = args.use_masked_im_modeling
            all_loss = self.loss(student_output, teacher_output, student_local_cls, masks, epoch)
            loss = all_loss.pop("loss")
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"the original step's loss is {loss.item()}")
        probs1 = teacher_output[0].chunk(g)
        probs2 = student_output[0].chunk(g)
        pred1 = utils.concat_all_gather(probs1[0].max(dim=1)[1])
        pred2 = utils.concat_all_gather(probs2[1].max(dim=1)[1])
        acc = (pred1 == pred2).sum() / pred1.size(0)
        self.optimizer.zero_grad()
        if self.fp16_scaler is None:
            loss.backward()
            if args.clip_grad:
                utils.clip_gradients(student, args.clip_grad)
            utils.cancel_gradients_last_layer(epoch, student, args.freeze_last_layer)
            self.optimizer.step()
        else:
            self.fp16_scaler.scale(loss).backward()
            if args.clip_grad:
                self.fp16_scaler.unscale_(self.optimizer)
                utils.clip_gradients(student, args.clip_grad)
            utils.cancel_gradients_last_layer(epoch, student, args.freeze_last_layer)
            self.fp16_scaler.step(self.optimizer)
            self.fp16_scaler.update()
        with torch.no_grad():
            m = self.momentum_schedule[it]
            for param_q, param_k in zip(self.params_q, self.params_k):
                param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        logged = [loss.item()] + [v.item() for v in all_loss.values()] + [float(acc)]
        return logged[0]


__all__ = ["OriginalStep"]
