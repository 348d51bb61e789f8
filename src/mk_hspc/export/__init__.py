"""Export of candidate cells for labelling: crops, static pages, QuPath GeoJSON and Label Studio tasks."""
