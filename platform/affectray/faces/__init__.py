"""The face stage shared by ingest and labelling: video decoding with real timestamps, MTCNN
detection, five-point alignment, JPEG coding and IoU tracks."""
