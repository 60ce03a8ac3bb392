"""The simulator applications: `mridc-sim` (link emulator, fleet) and the end-to-end demo, over mridc.lab."""
