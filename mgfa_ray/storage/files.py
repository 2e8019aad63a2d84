"""Reading files on any pyarrow filesystem (local, NFS, object store): read, test, list.

Writes go through :mod:`mgfa_ray.storage.atomic`.
"""

from __future__ import annotations


def fs_read(fs, path: str) -> bytes:
    """The bytes of the file ``path`` on ``fs``.

    Raises:
        FileNotFoundError: There is no such file.
    """
    with fs.open_input_file(path) as f:
        return f.read()


def fs_exists(fs, path: str) -> bool:
    """Whether ``path`` is a file on ``fs``."""
    import pyarrow.fs as pafs

    return fs.get_file_info(path).type == pafs.FileType.File


def fs_list(fs, directory: str) -> list[str]:
    """Base names of the files directly in ``directory`` on ``fs``, sorted (empty when it does not
    exist)."""
    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(directory, allow_not_found=True))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.File)
