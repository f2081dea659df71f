"""The bundle's conventions, declared once: modalities and their order, the variants, display names, and each
data layout's file names and label values. The networks, the data pipeline, the workflows, the phantom writer
and the datalist builder import them from here.

Only plain Python: importing it costs nothing and pulls no other package.
"""

from __future__ import annotations

#: Target modalities, in label and output-channel order: index k of a generator's one-hot label (and channel k of
#: its output) is ``TARGETS[k]``.
TARGETS = ("flair", "t1", "t1ce")
#: The source modality the generator reads.
SOURCE = "t2"
#: Channel order of every datalist ``image`` entry and of the 4-channel volumes: the targets, then the source.
CHANNELS = (*TARGETS, SOURCE)
#: Index of T2 in :data:`CHANNELS`.
T2_INDEX = CHANNELS.index(SOURCE)

#: The four generator variants of the paper, in table order; a checkpoint's ``arch`` stores the index.
VARIANTS = ("pix2pix", "mgan", "tcmgan", "tcmgan_bw")
#: The any-missing generator (any available modalities -> the missing ones, ``docs/anymissing.md``): accepted
#: wherever a variant is (``train.json --variant anymissing``), but not one of the paper's :data:`VARIANTS`, which
#: the study iterates over.
ANYMISSING = "anymissing"
#: Every generator ``train.json`` builds: the paper's four variants, then the any-missing generator.
GENERATORS = (*VARIANTS, ANYMISSING)

#: Display names of the modalities.
MODALITY_NAMES = {"flair": "FLAIR", "t1": "T1", "t1ce": "T1ce", "t2": "T2"}
#: Display names of the targets (tables, figures, MONAI Label bundle names).
TARGET_NAMES = {t: MODALITY_NAMES[t] for t in TARGETS}
#: Display names of the variants, in table order.
VARIANT_NAMES = {"pix2pix": "pix2pix", "mgan": "MGAN", "tcmgan": "TC-MGAN", "tcmgan_bw": "TC-MGAN bw"}

#: Internal label values of the tumour compartments (after ``MapLabelValued`` with :func:`scripts.runtime.data.
#: label_map`); 0 is background.
INTERNAL_LABELS = {"necrosis": 1, "edema": 2, "enhancing": 3}

#: The data set layouts the datalist builder reads and the phantom writes.
LAYOUTS = ("brats2018", "brats2021", "brats2023", "msd")

#: File-name endings (before ``.nii.gz`` / ``.nii``) of each modality and of the label in the BraTS layouts, in
#: :data:`CHANNELS` order then ``seg``. MSD keeps all four modalities in one 4D file instead.
FILE_SUFFIXES = {
    "brats2018": {"flair": "_flair", "t1": "_t1", "t1ce": "_t1ce", "t2": "_t2", "seg": "_seg"},
    "brats2021": {"flair": "_flair", "t1": "_t1", "t1ce": "_t1ce", "t2": "_t2", "seg": "_seg"},
    "brats2023": {"flair": "-t2f", "t1": "-t1n", "t1ce": "-t1c", "t2": "-t2w", "seg": "-seg"},
}

#: Label values of the tumour compartments as each layout's segmentation files store them.
LAYOUT_LABELS = {
    "brats2018": {"necrosis": 1, "edema": 2, "enhancing": 4},
    "brats2021": {"necrosis": 1, "edema": 2, "enhancing": 4},
    "brats2023": {"necrosis": 1, "edema": 2, "enhancing": 3},
    "msd": {"necrosis": 2, "edema": 1, "enhancing": 3},
}

#: The channels of an MSD Task01 4D image as its ``dataset.json`` names them, in :data:`CHANNELS` order.
MSD_MODALITIES = ("flair", "t1w", "t1gd", "t2w")


def file_label(layout: str, internal: int) -> int:
    """The value a ``layout``'s segmentation file stores for internal label ``internal`` (0 stays 0).

    Raises:
        KeyError: unknown layout or internal label.
    """
    if internal == 0:
        return 0
    name = next((n for n, v in INTERNAL_LABELS.items() if v == internal), None)
    if name is None:
        raise KeyError(f"no internal label {internal}; expected 0 or one of {INTERNAL_LABELS}")
    return LAYOUT_LABELS[layout][name]
