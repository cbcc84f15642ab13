"""Label orders (SPEC §1): devkit meta.mat leaves, map_clsloc.txt, val ground truth, sorted classes."""
import pytest

from imagebeam.transforms.inputs import labels


def test_devkit_leaves_and_val_ground_truth(ilsvrc):
    lm = labels.load_label_map(devkit=ilsvrc.devkit)
    assert lm.labels == {"n02119789": 1, "n01440764": 449, "n01751748": 490}  # non-leaf 1001 dropped
    assert lm.order == labels.ORDER_ILSVRC
    for name, (_, expected) in ilsvrc.val.items():
        assert lm.label_for(name, None) == expected
    assert lm.label_for("n01751748/n01751748_1000.JPEG", "n01751748") == 490


def test_class_map_matches_devkit(ilsvrc):
    cm = labels.load_label_map(class_map=ilsvrc.class_map)
    assert cm.labels == labels.load_label_map(devkit=ilsvrc.devkit).labels
    assert cm.val_ground_truth is None
    with pytest.raises(labels.LabelError, match="pass --devkit"):
        cm.label_for("ILSVRC2012_val_00000001.JPEG", None)


def test_unknown_wnid_is_named_in_the_reason(ilsvrc):
    lm = labels.load_label_map(devkit=ilsvrc.devkit)
    with pytest.raises(labels.LabelError, match=r"unknown WNID 'n99999999': not among the 3 classes"):
        lm.label_for("n99999999/x.JPEG", "n99999999")


def test_sorted_class_map_is_one_based_and_sorted():
    lm = labels.sorted_class_map(["zebra", "apple", "mango", "apple"])
    assert lm.labels == {"apple": 1, "mango": 2, "zebra": 3}
    assert lm.class_lines().splitlines()[0] == "1 apple apple"


def test_real_ids_from_spec():
    text = "n02119789 1 kit_fox\nn01751748 490 sea_snake\n"
    lm = labels.parse_class_map(text)
    assert lm.labels["n01751748"] == 490 and lm.names["n02119789"] == "kit_fox"
    with pytest.raises(ValueError, match="expected 'WNID ID name'"):
        labels.parse_class_map("n02119789 kitfox\n")


def test_class_of_uses_first_folder():
    assert labels.class_of("n01440764/n01440764_1.JPEG") == "n01440764"
    assert labels.class_of("./cat/sub/x.jpg") == "cat"
    assert labels.class_of("ILSVRC2012_val_00000001.JPEG") is None
