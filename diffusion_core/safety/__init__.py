"""The safety filter: a configured chain of detectors that publishes or quarantines each sample."""
