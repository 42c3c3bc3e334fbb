"""Opening an HDF5 file the user named, with one clear line when it cannot be read."""
from gpt2job.errors import UserError, first_line


def open_readable(path, field, fix):
    """h5py.File(path, "r"), or a UserError naming the file, the field and the fix."""
    import h5py
    try:
        return h5py.File(path, "r")
    except FileNotFoundError:
        raise UserError("no such file", path, field, "check the path")
    except (OSError, ValueError) as e:
        raise UserError(f"not a readable HDF5 file ({first_line(e)})", path, field, fix)


def contents(f, limit=8):
    """What an open file holds, for an error about a dataset it lacks: 'its datasets: a, g/b' or 'it has no dataset'."""
    import h5py
    names = []
    f.visititems(lambda name, obj: (names.append(name) if isinstance(obj, h5py.Dataset) else None)
                 if len(names) <= limit else True)
    if not names:
        return "it has no dataset"
    return "its datasets: " + ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")
