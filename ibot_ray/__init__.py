"""iBOT self-supervised pretraining of Vision Transformers: the method in plain PyTorch + timm (no Ray), and the
Python API of the ``ibot-ray`` command (:mod:`ibot_ray.api`; it imports Ray only when a run starts):

    import ibot_ray

    run = ibot_ray.pretrain(data="demo", config="demo", storage="runs", name="demo", optim={"epochs": 4})
    report = ibot_ray.evaluate(run, train="demo", val="demo")
    model = ibot_ray.load_backbone(run.export)
"""

from ibot_ray.api import PretrainRun, evaluate, load_backbone, pretrain

__all__ = ["PretrainRun", "evaluate", "load_backbone", "pretrain"]
