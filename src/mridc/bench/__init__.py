"""The benchmark applications behind `mridc-bench`, over the evaluation library mridc.lab."""
