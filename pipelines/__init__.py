"""Ray side of ibot-ray: the Ray Data ingest (``sources``, ``ingest``, ``collate``) and the Ray Train run.

Submodules are imported on demand (``from pipelines.ingest import build_train_dataset``) so that importing the
package stays cheap.
"""
