"""Benchmark readers on tiny datasets built here in each publisher's own layout and column names.

Each reader gets: good rows, a bad row that must come back as a Problem (file +
line), a missing file that must be an AflocError, and a coordinate check on a
non-square image (a box or hand-made asymmetric mask lands where it should,
rows never swapped with columns).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from afloc_cli.benchmark.datasets import READERS, Box, Item, fill_sizes, get_reader, read_dataset
from afloc_cli.benchmark.datasets.base import boxes_to_mask, fill_prompt, image_size
from afloc_cli.benchmark.datasets.rle import (
    decode_coco,
    decode_coco_string,
    decode_relative,
    encode_coco,
    encode_coco_string,
    encode_relative,
)
from afloc_cli.errors import AflocError

# ---------------------------------------------------------------- fixture writers


def write_image(path: Path, height: int, width: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((height, width), 128, dtype=np.uint8)).save(path)
    return path


def write_dicom(path: Path, height: int, width: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.Rows, ds.Columns = height, width
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.zeros((height, width), dtype=np.uint8).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def only_true(mask: np.ndarray) -> set[tuple[int, int]]:
    return {(int(r), int(c)) for r, c in zip(*np.nonzero(mask), strict=True)}


def by_id(items: list[Item]) -> dict[str, Item]:
    return {it.item_id: it for it in items}


# ---------------------------------------------------------------- base


def test_box_fill_is_rows_by_columns_and_clipped() -> None:
    mask = boxes_to_mask([Box(x=30, y=5, w=10, h=20), Box(x=55, y=35, w=20, h=20)], 40, 60)
    assert mask.shape == (40, 60)
    assert mask[5:25, 30:40].all() and mask[35:, 55:].all()
    assert mask.sum() == 10 * 20 + 5 * 5


def test_fill_prompt_lowercases_but_keeps_acronyms() -> None:
    assert fill_prompt("Findings suggesting {category}.", "Pleural Effusion") == "Findings suggesting pleural effusion."
    assert fill_prompt("{category}", "ILD") == "ILD"


def test_registry_and_errors(tmp_path: Path) -> None:
    assert set(READERS) == {"ms-cxr", "rsna", "chexlocalize", "covid-rural", "siim", "nih-bbox", "vindr", "synthetic"}
    with pytest.raises(AflocError, match="unknown dataset"):
        get_reader("mnist")
    with pytest.raises(AflocError, match="no such file"):
        read_dataset("siim", tmp_path / "absent")
    for name, reader in READERS.items():
        with pytest.raises(AflocError, match="expected") as err:
            reader.read(tmp_path)
        assert reader.published_at in str(err.value), name


# ---------------------------------------------------------------- RLE


def test_coco_string_decoder_on_hand_encoded_counts() -> None:
    assert decode_coco_string("4160") == [4, 1, 6, 1]
    assert decode_coco_string("T3") == [100]  # 100 = 0b11_00100: group 4 with "more", then 3
    assert decode_coco_string("12:OK") == [1, 2, 10, 1, 5]  # 4th and 5th are deltas -1 and -5 to counts[i-2]
    for counts in ([4, 1, 6, 1], [100], [1, 2, 10, 1, 5], [0, 7, 123456, 3, 2, 99999]):
        assert decode_coco_string(encode_coco_string(counts)) == counts


def test_coco_rle_is_column_major() -> None:
    # 4 rows x 3 columns, foreground at (0, 1) and (3, 2): column-major runs 4 bg, 1 fg, 6 bg, 1 fg
    mask = decode_coco("4160", 4, 3)
    assert mask.shape == (4, 3)
    assert only_true(mask) == {(0, 1), (3, 2)}
    assert encode_coco(mask) == [4, 1, 6, 1]
    with pytest.raises(ValueError):
        decode_coco([4, 1], 4, 3)


def test_relative_rle_starts_count_from_previous_run_and_are_column_major() -> None:
    mask = decode_relative("5 2 3 1", 12, 4)
    assert only_true(mask) == {(5, 0), (6, 0), (10, 0)}
    assert encode_relative(mask) == "5 2 3 1"
    union = decode_relative(["0 1", "24 2"], 12, 4)
    assert only_true(union) == {(0, 0), (0, 2), (1, 2)}
    with pytest.raises(ValueError):
        decode_relative("40 10", 12, 4)


# ---------------------------------------------------------------- MS-CXR

MS_HEADER = " dicom_id , category_name , label_text , path , x , y , w , h , image_width , image_height , split "


AAA = "files/p10/p10000032/s50414267/aaa.jpg"


def _ms_cxr_tree(tmp_path: Path) -> tuple[Path, Path]:
    """PhysioNet's own download: physionet.org/files/{ms-cxr/0.1, mimic-cxr-jpg/2.0.0}."""
    files = tmp_path / "physionet.org" / "files"
    ann = files / "ms-cxr" / "0.1"
    mimic = files / "mimic-cxr-jpg" / "2.0.0"
    write_image(mimic / "files/p10/p10000032/s50414267/aaa.jpg", 40, 60)
    write_image(mimic / "files/p10/p10000033/s50414268/bbb.jpg", 50, 30)
    return ann, mimic


def _ms_cxr_rows(split: bool = True) -> str:
    rows = [
        "aaa, Pneumonia , left lower lobe opacity ,files/p10/p10000032/s50414267/aaa.jpg,30,5,10,20,60,40,test",
        "aaa,Pneumonia,Left lower lobe opacity,files/p10/p10000032/s50414267/aaa.jpg,2,30,4,5,60,40,test",
        "aaa,Edema,mild edema,files/p10/p10000032/s50414267/aaa.jpg,0,0,60,40,60,40,test",
        "bbb,Pneumothorax,small apical pneumothorax,files/p10/p10000033/s50414268/bbb.jpg,1,2,3,4,30,50,train",
        "bbb,Pneumothorax,broken row,files/p10/p10000033/s50414268/bbb.jpg,abc,2,3,4,30,50,train",
        "ccc,Edema,no such image,files/p10/p10000034/s50414269/ccc.jpg,1,2,3,4,30,50,train",
    ]
    header = MS_HEADER
    if not split:
        header = header.rsplit(",", 1)[0]
        rows = [r.rsplit(",", 1)[0] for r in rows]
    return "\n".join([header, *rows]) + "\n"


def test_ms_cxr_v110_groups_boxes_per_phrase(tmp_path: Path) -> None:
    ann, mimic = _ms_cxr_tree(tmp_path)
    write_text(ann / "MS_CXR_Local_Alignment_v1.1.0.csv", _ms_cxr_rows())
    items, problems = read_dataset("ms-cxr", ann)
    ids = by_id(items)
    assert sorted(ids) == ["aaa/0", "aaa/1", "bbb/0"]
    first = ids["aaa/0"]
    # The phrase is one item whatever its case (the reference lowercases label_text); the prompt is the first row's.
    assert first.prompt == "left lower lobe opacity" and first.category == "Pneumonia"
    assert first.boxes == (Box(30, 5, 10, 20), Box(2, 30, 4, 5)) and first.positive and first.split == "test"
    assert first.image_path == mimic / "files/p10/p10000032/s50414267/aaa.jpg"
    assert (first.height, first.width) == (40, 60)
    truth = first.truth_mask()
    assert truth.shape == (40, 60)
    assert truth[5:25, 30:40].all() and truth[30:35, 2:6].all() and truth.sum() == 200 + 20
    assert [(p.row, "numbers" in p.reason) for p in problems[:1]] == [(6, True)]
    assert problems[1].row == 7 and "image not found" in problems[1].reason
    test_items, _ = read_dataset("ms-cxr", ann, split="test")
    assert {it.item_id for it in test_items} == {"aaa/0", "aaa/1"}
    # A phrase keeps its id whatever the split: ids count phrases over the whole file.
    edema = "mild edema,files/p10/p10000032/s50414267/aaa.jpg,0,0,60,40,60,40,"
    write_text(ann / "MS_CXR_Local_Alignment_v1.1.0.csv", _ms_cxr_rows().replace(edema + "test", edema + "val"))
    assert [it.item_id for it in read_dataset("ms-cxr", ann, split="val")[0]] == ["aaa/1"]


def test_ms_cxr_beside_mimic_cxr_jpg_2_1_0(tmp_path: Path) -> None:
    """PhysioNet serves MIMIC-CXR-JPG 2.1.0 now: physionet.org/files/{ms-cxr/1.1.0, mimic-cxr-jpg/2.1.0}.
    physionet.org itself holds a folder called files/, which must not be taken for the image root."""
    files = tmp_path / "physionet.org" / "files"
    ann = files / "ms-cxr" / "1.1.0"
    mimic = files / "mimic-cxr-jpg" / "2.1.0"
    write_image(mimic / "files/p10/p10000032/s50414267/aaa.jpg", 40, 60)
    write_image(mimic / "files/p10/p10000033/s50414268/bbb.jpg", 50, 30)
    write_text(ann / "MS_CXR_Local_Alignment_v1.1.0.csv", _ms_cxr_rows())
    items, problems = read_dataset("ms-cxr", ann)
    assert sorted(it.item_id for it in items) == ["aaa/0", "aaa/1", "bbb/0"]
    assert all(it.image_path.is_relative_to(mimic) for it in items)
    assert [p.row for p in problems] == [6, 7]  # the broken row and the image that is truly missing


def test_ms_cxr_v100_has_no_split_and_accepts_mimic_root(tmp_path: Path) -> None:
    ann, mimic = _ms_cxr_tree(tmp_path)
    elsewhere = tmp_path / "annotations"
    write_text(elsewhere / "MS_CXR_Local_Alignment_v1.0.0.csv", _ms_cxr_rows(split=False))
    with pytest.raises(AflocError, match="MIMIC-CXR-JPG.*with --mimic-root"):  # the CLI option, not a keyword
        read_dataset("ms-cxr", elsewhere)
    items, problems = read_dataset("ms-cxr", elsewhere, mimic_root=mimic)
    assert len(items) == 3 and all(it.split is None for it in items) and len(problems) == 2
    with pytest.raises(AflocError, match="no split column"):
        read_dataset("ms-cxr", elsewhere, split="test", mimic_root=mimic)


def test_ms_cxr_coco_json(tmp_path: Path) -> None:
    ann, _ = _ms_cxr_tree(tmp_path)
    coco = {
        "images": [{"id": 1, "file_name": "aaa.jpg", "path": f"{AAA}", "width": 60, "height": 40}],
        "categories": [{"id": 3, "name": "Pneumonia"}],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 3, "bbox": [30, 5, 10, 20], "label_text": "opacity"},
            {"id": 11, "image_id": 1, "category_id": 3, "bbox": [2, 30, 4, 5], "label_text": "Opacity"},
            {"id": 12, "image_id": 9, "category_id": 3, "bbox": [2, 30, 4, 5], "label_text": "orphan"},
            "not an annotation",
            {"id": 14, "image_id": [1], "category_id": 3, "bbox": 7, "label_text": "odd"},
        ],
    }
    write_text(ann / "MS_CXR_Local_Alignment_v1.0.0.json", json.dumps(coco))
    items, problems = read_dataset("ms-cxr", ann)
    assert len(items) == 1 and items[0].boxes == (Box(30, 5, 10, 20), Box(2, 30, 4, 5))
    assert items[0].image_id == "aaa" and items[0].truth_mask()[5:25, 30:40].all()
    assert len(problems) == 3 and "annotation 12" in problems[0].reason
    assert "annotations[3]: expected an object" in problems[1].reason and "annotation 14" in problems[2].reason


# ---------------------------------------------------------------- RSNA


def test_rsna_kaggle_labels(tmp_path: Path) -> None:
    write_dicom(tmp_path / "stage_2_train_images/p1.dcm", 32, 48)
    write_dicom(tmp_path / "stage_2_train_images/p2.dcm", 32, 48)
    write_dicom(tmp_path / "stage_2_train_images/p3.dcm", 32, 48)
    write_text(
        tmp_path / "stage_2_train_labels.csv",
        "patientId,x,y,width,height,Target\np1,40.0,2.0,6.0,10.0,1\np1,1,20,3,4,1\np2,,,,,0\np3,,,,,1\np4,,,,,0\n",
    )
    items, problems = read_dataset("rsna", tmp_path)
    ids = by_id(items)
    assert set(ids) == {"p1", "p2"}
    assert ids["p1"].positive and not ids["p2"].positive
    assert ids["p1"].prompt == "Findings suggesting pneumonia." and ids["p1"].split is None
    # The boxes are in RSNA's 1024x1024 pixels whatever the file's size: the item says so, fill_sizes keeps it.
    sized = by_id(fill_sizes(items))
    assert (sized["p1"].height, sized["p1"].width) == (1024, 1024)
    truth = sized["p1"].truth_mask()
    assert truth.shape == (1024, 1024) and truth[2:12, 40:46].all() and truth[20:24, 1:4].all() and truth.sum() == 72
    assert not sized["p2"].truth_mask().any()
    assert [p.row for p in problems] == [5, 6]
    with pytest.raises(AflocError, match="no split"):
        read_dataset("rsna", tmp_path, split="train")


def test_rsna_medklip_test_list(tmp_path: Path) -> None:
    write_dicom(tmp_path / "stage_2_train_images/p1.dcm", 32, 48)
    write_dicom(tmp_path / "stage_2_train_images/p2.dcm", 32, 48)
    test_list = write_text(
        tmp_path / "lists" / "test.csv",
        "ID,img_path,boxes,classes\n"
        "p1,/mnt/cfs/RSNA-2018/x/1.2.3.dcm,40.0;2.0;6.0;10.0|1.0;20.0;3.0;4.0,1\n"
        "p2,/mnt/cfs/RSNA-2018/x/1.2.4.dcm,nan,0\n"
        "p5,/mnt/cfs/RSNA-2018/x/1.2.5.dcm,1;2;3,1\n",
    )
    items, problems = read_dataset("rsna", tmp_path, split="test", test_list=test_list)
    ids = by_id(items)
    assert set(ids) == {"p1", "p2"} and all(it.split == "test" for it in items)
    assert ids["p1"].boxes == (Box(40, 2, 6, 10), Box(1, 20, 3, 4)) and not ids["p2"].positive
    assert ids["p1"].image_path == tmp_path / "stage_2_train_images/p1.dcm"
    assert len(problems) == 1 and problems[0].row == 4
    # the list itself as root: images found beside it or one folder up
    again, _ = read_dataset("rsna", test_list)
    assert {it.item_id for it in again} == {"p1", "p2"}
    with pytest.raises(AflocError, match="MedKLIP's test list") as refused:
        read_dataset("rsna", tmp_path, split="test")
    assert "as --root" in str(refused.value) and "test_list=" not in str(refused.value)  # the CLI's words
    with pytest.raises(AflocError, match="takes no option mimic_root"):
        read_dataset("rsna", tmp_path, mimic_root=tmp_path)


# ---------------------------------------------------------------- CheXlocalize


def test_chexlocalize_column_major_rle_and_negatives(tmp_path: Path) -> None:
    write_image(tmp_path / "CheXpert/val/patient64541/study1/view1_frontal.jpg", 4, 3)
    write_image(tmp_path / "CheXpert/val/patient64542/study1/view1_frontal.jpg", 4, 3)
    segs = {
        "patient64541_study1_view1_frontal": {
            "Airspace Opacity": {"size": [4, 3], "counts": "4160"},
            "Cardiomegaly": {"size": [4, 3], "counts": [0, 12]},
            "Edema": {"size": [4, 3], "counts": [12]},
            "Atelectasis": {"size": [4, 3], "counts": [5, 1]},  # covers 6 of 12 pixels: a problem
        },
        "patient64542_study1_view1_frontal": {"Pneumothorax": {"size": [4, 3], "counts": "4160"}},
        "not_an_id": {},
    }
    write_text(tmp_path / "CheXlocalize/gt_segmentations_val.json", json.dumps(segs))
    items, problems = read_dataset("chexlocalize", tmp_path)
    ids = by_id(items)
    opacity = ids["patient64541_study1_view1_frontal/Lung Opacity"]
    assert opacity.positive and opacity.prompt == "Findings suggesting lung opacity." and opacity.split == "val"
    assert only_true(opacity.truth_mask(4, 3)) == {(0, 1), (3, 2)}
    assert ids["patient64541_study1_view1_frontal/Cardiomegaly"].truth_mask().all()
    edema = ids["patient64541_study1_view1_frontal/Edema"]
    assert not edema.positive and not edema.truth_mask().any()
    missing_key = ids["patient64541_study1_view1_frontal/Support Devices"]
    assert not missing_key.positive and missing_key.truth_mask().shape == (4, 3)
    assert "patient64541_study1_view1_frontal/Atelectasis" not in ids
    assert len([i for i in items if i.image_id == "patient64542_study1_view1_frontal"]) == 10
    reasons = " | ".join(p.reason for p in problems)
    assert "Atelectasis" in reasons and "not_an_id" in reasons and len(problems) == 2
    with pytest.raises(AflocError, match="gt_segmentations_test.json"):
        read_dataset("chexlocalize", tmp_path, split="test")
    with pytest.raises(ValueError, match="mask is 4x3"):
        opacity.truth_mask(3, 4)


def test_chexlocalize_first_release_and_pointing_at_the_json_folder(tmp_path: Path) -> None:
    """The first (val-only) release: gt_segmentations_val.json beside CheXpert-v1.0/valid/ (cheXlocalize's README)."""
    first = tmp_path / "first"
    write_image(first / "CheXpert-v1.0/valid/patient64541/study1/view1_frontal.jpg", 4, 3)
    segs = {"patient64541_study1_view1_frontal": {"Cardiomegaly": {"size": [4, 3], "counts": [0, 12]}}}
    write_text(first / "gt_segmentations_val.json", json.dumps(segs))
    items, problems = read_dataset("chexlocalize", first)
    assert problems == [] and len(items) == 10
    assert items[0].image_path == first / "CheXpert-v1.0/valid/patient64541/study1/view1_frontal.jpg"
    # The current release, given its CheXlocalize folder rather than the root: images one level up.
    current = tmp_path / "current"
    write_image(current / "CheXpert/val/patient64541/study1/view1_frontal.jpg", 4, 3)
    write_text(current / "CheXlocalize/gt_segmentations_val.json", json.dumps(segs))
    items, problems = read_dataset("chexlocalize", current / "CheXlocalize")
    assert problems == [] and {it.image_path.parent.parent.parent.name for it in items} == {"val"}


def test_annotation_json_with_a_stray_byte_is_read(tmp_path: Path) -> None:
    """CheXlocalize's and MS-CXR's JSON are read as leniently as the CSVs: a bad byte is no traceback."""
    write_image(tmp_path / "CheXpert/val/patient64541/study1/view1_frontal.jpg", 4, 3)
    raw = b'{"patient64541_study1_view1_frontal": {"Cardiomegaly\xe9": {"size": [4, 3], "counts": [0, 12]}}}'
    (tmp_path / "CheXlocalize").mkdir()
    (tmp_path / "CheXlocalize/gt_segmentations_val.json").write_bytes(raw)
    items, _ = read_dataset("chexlocalize", tmp_path)
    assert any(it.category == "Cardiomegaly\ufffd" for it in items)


# ---------------------------------------------------------------- COVID Rural


def test_covid_rural_masks(tmp_path: Path) -> None:
    write_image(tmp_path / "jpgs/a.jpg", 20, 30)
    write_image(tmp_path / "jpgs/b.jpg", 20, 30)
    write_image(tmp_path / "jpgs/c.jpg", 20, 30)
    (tmp_path / "jpgs/jsons").mkdir()
    mask = np.zeros((20, 30), dtype=np.uint8)
    mask[2:6, 20:28] = 255
    (tmp_path / "pngs_masks").mkdir()
    Image.fromarray(mask).save(tmp_path / "pngs_masks/a.png")
    Image.fromarray(np.zeros((20, 30), dtype=np.uint8)).save(tmp_path / "pngs_masks/b.png")
    Image.fromarray(np.zeros((20, 30), dtype=np.uint8)).save(tmp_path / "pngs_masks/orphan.png")
    items, problems = read_dataset("covid-rural", tmp_path)
    ids = by_id(items)
    assert set(ids) == {"a", "b"}
    assert ids["a"].positive and not ids["b"].positive
    assert ids["a"].prompt == "Findings suggesting pneumonia."
    truth = ids["a"].truth_mask()
    assert truth.shape == (20, 30) and truth[2:6, 20:28].all() and truth.sum() == 32
    assert sorted(Path(p.file).name for p in problems) == ["c.jpg", "orphan.png"]


# ---------------------------------------------------------------- SIIM-ACR


def test_siim_relative_rle_transposed(tmp_path: Path) -> None:
    for image_id in ("img1", "img2", "img3"):
        write_dicom(tmp_path / f"dicom-images-train/1.2.{image_id}/1.3.{image_id}/{image_id}.dcm", 8, 8)
    write_text(
        tmp_path / "train-rle.csv",
        "ImageId, EncodedPixels\nimg1, 10 3\nimg2, -1\nimg3, 0 1\nimg3, 2048 2\nimg3, 5 x\nimg4, -1\n",
    )
    items, problems = read_dataset("siim", tmp_path)
    ids = by_id(items)
    assert set(ids) == {"img1", "img2", "img3"}
    one = ids["img1"]
    assert one.positive and (one.height, one.width) == (1024, 1024)
    assert only_true(one.truth_mask()) == {(10, 0), (11, 0), (12, 0)}  # column 0, rows 10-12: transposed
    assert not ids["img2"].positive and not ids["img2"].truth_mask().any()
    assert only_true(ids["img3"].truth_mask()) == {(0, 0), (0, 2), (1, 2)}
    assert [p.row for p in problems] == [6, 7]


# ---------------------------------------------------------------- NIH ChestX-ray14


def test_nih_bbox_positional_columns_and_split_image_folders(tmp_path: Path) -> None:
    write_image(tmp_path / "images_001/images/00000001_000.png", 40, 50)
    write_image(tmp_path / "images_002/images/00000002_000.png", 40, 50)
    write_text(
        tmp_path / "BBox_List_2017.csv",
        "Image Index,Finding Label,Bbox [x,y,w,h],,,\n"
        "00000001_000.png,Infiltrate,10.7,20.2,5.9,3.1,,,\n"
        "00000001_000.png,Infiltrate,40,0,20,5,,,\n"
        "00000002_000.png,Mass,1,2,3,4,,,\n"
        "00000002_000.png,Mass,1,2,,4,,,\n"
        "00000009_000.png,Nodule,1,2,3,4,,,\n",
    )
    items, problems = read_dataset("nih-bbox", tmp_path)
    ids = by_id(items)
    assert set(ids) == {"00000001_000/Infiltration", "00000002_000/Mass"}
    inf = fill_sizes([ids["00000001_000/Infiltration"]])[0]
    assert inf.prompt == "Findings suggesting infiltration."
    truth = inf.truth_mask()
    assert truth.shape == (1024, 1024)  # the published size, which the boxes are in
    assert truth[20:23, 10:15].all() and truth[0:5, 40:60].all() and truth.sum() == 15 + 100
    assert [p.row for p in problems] == [5, 6]


# ---------------------------------------------------------------- VinDr-CXR


def test_vindr_union_of_radiologists_and_negatives(tmp_path: Path) -> None:
    write_dicom(tmp_path / "train/i1.dicom", 30, 40)
    write_dicom(tmp_path / "train/i2.dicom", 30, 40)
    write_text(
        tmp_path / "annotations/annotations_train.csv",
        "image_id,rad_id,class_name,x_min,y_min,x_max,y_max\n"
        "i1,R1,Aortic enlargement,5,2,15,4\n"
        "i1,R2,Aortic enlargement,30,20,40,30\n"
        "i1,R3,No finding,,,,\n"
        "i2,R1,No finding,,,,\n"
        "i2,R2,Nodule/Mass,10,10,5,12\n"
        "i3,R1,Nodule/Mass,1,1,2,2\n",
    )
    items, problems = read_dataset("vindr", tmp_path)
    ids = by_id(items)
    # i2's Nodule/Mass box is unusable (inverted): neither a positive nor a negative, so left out
    assert set(ids) == {"i1/Aortic enlargement", "i1/Nodule/Mass", "i2/Aortic enlargement"}
    aortic = ids["i1/Aortic enlargement"]
    assert aortic.positive and aortic.split == "train" and len(aortic.boxes) == 2
    truth = aortic.truth_mask(30, 40)
    assert truth[2:4, 5:15].all() and truth[20:30, 30:40].all() and truth.sum() == 20 + 100
    assert not ids["i1/Nodule/Mass"].positive and not ids["i2/Aortic enlargement"].positive
    assert [p.row for p in problems] == [6, 7]  # one bad line, one problem row
    assert "i2/Nodule/Mass is left out" in problems[0].reason
    assert "neither a positive nor a negative" in problems[0].reason
    with pytest.raises(AflocError, match="annotations_test.csv"):
        read_dataset("vindr", tmp_path, split="test")


def test_vindr_kaggle_train_csv(tmp_path: Path) -> None:
    write_dicom(tmp_path / "train/k1.dicom", 30, 40)
    write_text(
        tmp_path / "train.csv",
        "image_id,class_name,class_id,rad_id,x_min,y_min,x_max,y_max\n"
        "k1,Cardiomegaly,3,R8,10.5,12.0,20.5,18.0\n"
        "k1,No finding,14,R9,,,,\n",
    )
    items, problems = read_dataset("vindr", tmp_path, split="train")
    assert [it.item_id for it in items] == ["k1/Cardiomegaly"] and not problems
    assert items[0].truth_mask(30, 40)[12:18, 10:20].all()


# ---------------------------------------------------------------- synthetic corpus


def test_synthetic_positives_from_phrases_negatives_from_labels(tmp_path: Path) -> None:
    write_image(tmp_path / "images/s1.png", 24, 32)
    write_image(tmp_path / "images/s2.png", 24, 32)
    write_text(
        tmp_path / "MS_CXR_Local_Alignment_v1.1.0.csv",
        MS_HEADER.replace(" ", "")
        + "\n"
        + "s1,Pleural Effusion,left effusion,images/s1.png,20,10,8,6,32,24,train\n"
        + "s1,Pleural Effusion,left effusion,images/s1.png,0,0,2,2,32,24,train\n",
    )
    write_text(
        tmp_path / "labels.csv",
        "image_id,path,split,pleural_effusion,pneumothorax\n"
        "s1,images/s1.png,train,1,0\n"
        "s2,images/s2.png,train,0,1\n"
        "s3,images/s3.png,train,0,0\n",
    )
    items, problems = read_dataset("synthetic", tmp_path)
    ids = by_id(items)
    assert set(ids) == {"s1/0", "s1/pneumothorax", "s2/Pleural Effusion"}
    pos = ids["s1/0"]
    assert pos.prompt == "left effusion" and pos.image_path == tmp_path / "images/s1.png"
    assert pos.truth_mask()[10:16, 20:28].all() and pos.truth_mask().sum() == 48 + 4
    neg = ids["s2/Pleural Effusion"]
    assert not neg.positive and neg.prompt == "Findings suggesting pleural effusion." and neg.split == "train"
    assert image_size(neg.image_path) == (24, 32)
    assert [p.row for p in problems] == [3, 4]
    assert "pneumothorax is 1" in problems[0].reason and "image not found" in problems[1].reason
    assert len(read_dataset("synthetic", tmp_path, split="train")[0]) == len(items)
    with pytest.raises(AflocError, match="no split"):
        read_dataset("synthetic", tmp_path, split="val")


# ---------------------------------------------------------------- every CSV reader


def test_a_stray_latin1_byte_in_an_annotation_csv_is_read_not_a_crash(tmp_path: Path) -> None:
    """One non-UTF-8 byte (0xE9) in one row: the other rows are read; the spoiled one is a problem row."""
    rsna = tmp_path / "rsna"
    write_dicom(rsna / "stage_2_train_images/p1.dcm", 8, 8)
    (rsna / "stage_2_train_labels.csv").write_bytes(
        b"patientId,x,y,width,height,Target\np1,1,2,3,4,1\np\xe9,1,2,3,4,1\n")
    nih = tmp_path / "nih"
    write_image(nih / "images/00000001_000.png", 8, 8)
    (nih / "BBox_List_2017.csv").write_bytes(
        b"Image Index,Finding Label,Bbox [x,y,w,h],,,\n00000001_000.png,Mass,1,2,3,4,,,\n"
        b"0000000\xe9_000.png,Mass,1,2,3,4,,,\n")
    vindr = tmp_path / "vindr"
    write_dicom(vindr / "train/i1.dicom", 8, 8)
    (vindr / "annotations").mkdir()
    (vindr / "annotations/annotations_train.csv").write_bytes(
        b"image_id,rad_id,class_name,x_min,y_min,x_max,y_max\ni1,R1,Aortic enlargement,1,1,4,4\n"
        b"i\xe9,R1,Aortic enlargement,1,1,4,4\n")
    siim = tmp_path / "siim"
    write_dicom(siim / "dicom-images-train/1/2/img1.dcm", 8, 8)
    (siim / "train-rle.csv").write_bytes(b"ImageId, EncodedPixels\nimg1, 10 3\nimg\xe9, 10 3\n")
    for name, root in (("rsna", rsna), ("nih-bbox", nih), ("vindr", vindr), ("siim", siim)):
        items, problems = read_dataset(name, root)
        assert len(items) == 1 and items[0].positive, name
        assert [p.row for p in problems] == [3] and "\ufffd" in problems[0].reason, name
