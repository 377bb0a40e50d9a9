"""Input pipelines: the synthetic world, COCO panoptic, grain loaders."""
