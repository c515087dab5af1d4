"""Bad input gets one clear line before long work starts: every file of a data set checked (headers only), the test
split of eval, and a user's ValueError turned into one line (docs/ERRORS.md lists each case)."""
from pathlib import Path

from PIL import Image

from extras.folders import labelled_folder, open_data


def or_exit(fn, *args, **kwargs):
    """fn(*args, **kwargs), with a ValueError or FileNotFoundError (a file, a folder, weights that do not fit the
    settings) turned into one line for the user."""
    try:
        return fn(*args, **kwargs)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(str(e))


def probe(path):
    """A fast check of an image file without decoding its pixels: the header must parse and a PNG or JPEG must end
    with its end marker (a truncated file does not). Returns (width, height), or what is wrong."""
    try:
        with Image.open(path) as im:
            size, fmt = im.size, im.format
        with open(path, "rb") as f:
            f.seek(max(0, Path(path).stat().st_size - 64))
            tail = f.read()
    except Exception as e:  # OSError, PIL.UnidentifiedImageError, SyntaxError...
        return f"not a readable image ({type(e).__name__}: {e})"
    if (fmt == "PNG" and b"IEND" not in tail[-12:]) or (fmt == "JPEG" and b"\xff\xd9" not in tail):
        return f"truncated {fmt} file (no end marker)"
    return size


def check_split(ds):
    """Every problem of a split at once, one line each: unreadable or truncated images and masks, masks whose size
    differs from their image's."""
    problems = []
    for path, mask_path, _, _ in getattr(ds, "records", []):
        size = probe(path)
        if isinstance(size, str):
            problems.append(f"{path}: {size}")
        if mask_path is not None:
            mask_size = probe(mask_path)
            if isinstance(mask_size, str):
                problems.append(f"{mask_path} (mask of {Path(path).name}): {mask_size}")
            elif not isinstance(size, str) and mask_size != size:
                problems.append(f"{mask_path}: mask is {mask_size[0]}x{mask_size[1]} but its image is {size[0]}x"
                                f"{size[1]}; resize the mask to its image or replace it")
    return problems


def check_dataset(path, img_size, test=None, test_masks=None):
    """Both splits of --data (the test split: --test's labelled folder if given; a plain folder without one has none)
    and every problem found in them at once. Returns ({split: dataset}, problems)."""
    splits, problems = {}, []
    for split in ("train", "test"):
        try:
            if split == "test" and test:
                splits[split] = labelled_folder(test, img_size, test_masks)
            elif split == "test" and getattr(splits.get("train"), "layout", None) == "folder":
                continue
            else:
                splits[split] = open_data(path, split, img_size)
            problems += check_split(splits[split])
        except (FileNotFoundError, ValueError) as e:
            problems.append(str(e))
    if test and Path(path).is_dir() and Path(test).resolve().is_relative_to(Path(path).resolve()):
        problems.append(f"--test {test} is inside --data {path}: its images would be trained on as normal; "
                        "move it out of the training folder")
    return splits, list(dict.fromkeys(problems))  # a missing folder fails both splits alike


def calibration_problems(opts, img_size, test):
    """What is wrong with --calibrate's folder: not a labelled folder with good and defective images, unreadable
    files, or the test split itself (a threshold is never set on it)."""
    folder, test_root = Path(opts.calibrate).resolve(), opts.test or getattr(test, "root", None)
    inside = test_root is not None and (folder.is_relative_to(Path(test_root).resolve())
                                        or Path(test_root).resolve().is_relative_to(folder))
    if inside:
        return [f"--calibrate {opts.calibrate}: it holds or is part of the test split ({test_root}); a threshold is "
                "never set on test images: pass a labelled folder of other images"]
    try:
        return check_split(labelled_folder(opts.calibrate, img_size))
    except (FileNotFoundError, ValueError) as e:
        return [f"--calibrate: {e}"]


def preflight(cfg, opts):
    """Both splits of a training run, every file checked before the first step: one SystemExit with every problem."""
    splits, problems = check_dataset(opts.data, cfg.img_size, opts.test or None, opts.test_masks or None)
    if opts.calibrate:
        problems += calibration_problems(opts, cfg.img_size, splits.get("test"))
    if len(problems) == 1 and not splits:
        raise SystemExit(problems[0])
    if problems:
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise SystemExit(f"{opts.data}: {len(problems)} problem(s) found before training; fix them and start again:"
                         "\n  " + "\n  ".join(problems[:10]) + more)
    return splits


def open_test(args, opts, img_size):
    """eval's test split: args' --test or --data, else (args None, or neither given) the run's own."""
    given = args is not None and (args.test or args.data)
    test, masks = (args.test, args.test_masks) if given else (opts.test, opts.test_masks)
    if not (given or test or opts.data):
        raise SystemExit("this run names no data (imported from the authors' checkpoint without --data); pass "
                         "--data ROOT/CLASS or --test TESTDIR")
    split = or_exit(labelled_folder, test, img_size, masks or None) if test else \
        or_exit(open_data, args.data if given else opts.data, "test", img_size)
    problems = check_split(split)
    if problems:
        raise SystemExit(f"{test or (args.data if given else opts.data)}: {len(problems)} unreadable test file(s):\n  "
                         + "\n  ".join(problems[:10]))
    return split
