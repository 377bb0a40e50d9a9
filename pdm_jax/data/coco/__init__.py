"""COCO 2017 panoptic: the category table and decoding, preparation to ArrayRecord, the reader."""
