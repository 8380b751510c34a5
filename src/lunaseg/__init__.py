"""lunaseg: lung-nodule candidate segmentation on chest CT (LUNA16 / LIDC-IDRI)."""

__version__ = "0.1.0"
