"""kdray-dkd: decoupled knowledge distillation as a kdray condition, with its own model and data.

Importing the package registers (the ``kdray.plugins`` entry point does it for every kdray process):

- condition ``dkd`` (kdray_dkd.dkd): DKD, Zhao et al., CVPR 2022, audited like KD against SIDDO and RCD;
- architecture ``dkd_mlp`` (kdray_dkd.model): a two-layer perceptron for feature vectors;
- data set ``dkd_blobs`` (kdray_dkd.data): a seeded synthetic classification task, no download.
"""
from kdray.data import ANY, declare_dataset
from kdray.models import declare_model

from kdray_dkd import dkd  # noqa: F401  (registers the condition)

declare_model("dkd_mlp", "kdray_dkd.model:mlp", accepts=(ANY,))
declare_dataset("dkd_blobs", "kdray_dkd.data:blobs", ANY, classes=5, reads_files=False)
