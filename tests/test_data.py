import pytest
import torch

from lit_ar.data import DigitsDataset, ImageDataModule, ShapesDataset
from lit_ar.data.transforms import ImageTransform


def setup_dm(**kwargs) -> ImageDataModule:
    dm = ImageDataModule(**kwargs)
    dm.setup("fit")
    return dm


def first_batch(dm: ImageDataModule) -> dict[str, torch.Tensor]:
    return next(iter(dm.train_dataloader()))


def test_shapes_is_deterministic_balanced_and_varied():
    a, b = ShapesDataset(40, 32, seed=3), ShapesDataset(40, 32, seed=3)
    for i in (0, 17, 39):
        assert torch.equal(a[i][0], b[i][0]) and a[i][1] == b[i][1]
    assert not torch.equal(a[0][0], ShapesDataset(40, 32, seed=4)[0][0])
    labels = [a[i][1] for i in range(40)]
    assert sorted(set(labels)) == list(range(10)) and all(labels.count(c) == 4 for c in range(10))
    # two images of the same class differ (position, size, rotation, colour)
    assert not torch.equal(a[0][0], a[10][0])
    assert ShapesDataset(4, 128)[0][0].shape == (3, 128, 128)
    # the splits hold different images; a split name that is not one of them is refused by name
    assert not torch.equal(a[0][0], ShapesDataset(40, 32, seed=3, split="validation")[0][0])
    with pytest.raises(ValueError, match=r"split='val' is not known; known splits: \('train', 'validation', 'test'\)"):
        ShapesDataset(4, 32, split="val")


def test_digits_are_the_real_sklearn_digits():
    ds = DigitsDataset()
    assert len(ds) == 1797 and ds.num_classes == 10
    image, label = ds[0]
    assert image.shape == (1, 8, 8) and image.dtype == torch.uint8 and label == 0
    assert sorted({int(ds.labels[i]) for i in range(len(ds))}) == list(range(10))


@pytest.mark.parametrize("dataset,channels,size", [("shapes", 3, 32), ("digits", 1, 24), ("digits", 3, 16)])
def test_builtin_batches(dataset, channels, size):
    dm = setup_dm(dataset=dataset, channels=channels, image_size=size, batch_size=8, num_train=64, num_val=16)
    batch = first_batch(dm)
    assert batch["image"].shape == (8, channels, size, size) and batch["image"].dtype == torch.float32
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1 and batch["image"].std() > 0.1
    assert batch["label"].shape == (8,) and batch["label"].dtype == torch.long
    assert dm.num_classes == 10


def test_digits_validation_is_held_out_with_a_fixed_seed():
    dm1, dm2 = setup_dm(dataset="digits", val_fraction=0.1), setup_dm(dataset="digits", val_fraction=0.1)
    v1, t1 = set(dm1.splits.val.indices), set(dm1.splits.train.indices)
    assert v1 == set(dm2.splits.val.indices) and not (v1 & t1) and len(v1) + len(t1) == 1797
    assert len(v1) == 180


def test_transforms_resize_crop_flip():
    img = torch.zeros(3, 20, 40, dtype=torch.uint8)
    img[:, :, :20] = 255  # left half white
    center = ImageTransform(10, 3)(img)
    assert center.shape == (3, 10, 10)
    g = torch.Generator().manual_seed(0)
    crops = {tuple(ImageTransform(10, 3, crop="random")(img, g)[0, 5].tolist()) for _ in range(20)}
    assert len(crops) > 1  # random crops land in different places
    flipped = ImageTransform(10, 3, crop="center", hflip=True)
    outs = {float(flipped(img, g)[0, :, 0].mean()) for _ in range(20)}
    assert len(outs) == 2  # flipped and not flipped
    grey = ImageTransform(8, 1)(img)
    assert grey.shape == (1, 8, 8)


def test_image_folder_source(small_images):
    dm = setup_dm(dataset="imagefolder", data_dir=str(small_images), image_size=16, batch_size=4, val_fraction=0.25)
    assert dm.num_classes == 3
    assert len(dm.train_set) + len(dm.val_set) == 12 and len(dm.val_set) == 3
    batch = first_batch(dm)
    assert batch["image"].shape == (4, 3, 16, 16)
    # the class comes from the sub-folder: each class's images have a saturated channel of its own
    image, label = dm.train_set[0]["image"], int(dm.train_set[0]["label"])
    assert image[label].mean() > 0.9


def test_parquet_source_and_unconditional(tmp_path, small_images):
    import datasets

    ds = datasets.load_dataset("imagefolder", data_dir=str(small_images), split="train")
    ds = ds.rename_column("label", "cls")
    path = tmp_path / "images.parquet"
    ds.to_parquet(str(path))
    dm = setup_dm(dataset="parquet", data_files=str(path), label_column="cls", image_size=8, batch_size=2)
    assert dm.num_classes == 3 and first_batch(dm)["image"].shape == (2, 3, 8, 8)
    unc = setup_dm(dataset="parquet", data_files=str(path), unconditional=True, image_size=8, batch_size=12,
                   drop_last=False, val_fraction=0.5)  # fmt: skip
    assert unc.num_classes == 1 and set(first_batch(unc)["label"].tolist()) == {0}


def test_hub_name_path_on_a_local_hub_layout(tmp_path, small_images):
    """The hub code path (`load_dataset(name)`) run on a repository laid out as on the hub, made here."""
    import datasets

    repo = tmp_path / "user__my_images"
    (repo / "data").mkdir(parents=True)
    full = datasets.load_dataset("imagefolder", data_dir=str(small_images), split="train")
    split = full.train_test_split(test_size=3, seed=0)
    split["train"].to_parquet(str(repo / "data" / "train-00000-of-00001.parquet"))
    split["test"].to_parquet(str(repo / "data" / "validation-00000-of-00001.parquet"))
    dm = setup_dm(dataset=str(repo), image_size=8, batch_size=3)
    assert len(dm.val_set) == 3 and len(dm.train_set) == 9 and dm.num_classes == 3


# The bad-input tests (unknown dataset, missing or empty folders, corrupt images, missing columns, bad settings, a
# global batch size that does not divide) are rows of the matrix in tests/test_bad_inputs.py.


def test_corrupt_image_can_be_skipped(small_images):
    bad = small_images / "dog" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)
    dm = setup_dm(dataset="imagefolder", data_dir=str(small_images), skip_corrupt=True, image_size=8, batch_size=2)
    assert dm.splits.skipped_corrupt == 1 and len(dm.train_set) + len(dm.val_set) == 12


def test_global_batch_size_is_split_across_devices():
    class FakeTrainer:
        world_size = 4

    dm = ImageDataModule(global_batch_size=64)
    dm.trainer = FakeTrainer()
    assert dm.per_device_batch_size() == 16


def test_predict_labels_are_class_balanced_and_sharded_without_duplicates():
    class FakeTrainer:
        world_size, global_rank = 1, 0

    dm = ImageDataModule(num_train=20, num_val=10, predict_per_class=3, batch_size=4)
    one = [b for b in dm.predict_dataloader()]
    labels = torch.cat([b["label"] for b in one])
    assert torch.bincount(labels).tolist() == [3] * 10
    shards = []
    for rank in (0, 1):
        FakeTrainer.world_size, FakeTrainer.global_rank = 2, rank
        dm.trainer = FakeTrainer()
        shards.append(torch.cat([b["index"] for b in dm.predict_dataloader()]))
    assert sorted(torch.cat(shards).tolist()) == list(range(30))
