"""bench.accuracy.gap_line: D-Cube's distance to the best published MedMNIST v2 row."""

from bench.accuracy import gap_line


def test_gap_line_compares_the_seed_mean_with_the_best_published_row_per_metric():
    runs = [{"test": {"accuracy": 0.80, "auc": 0.90}}, {"test": {"accuracy": 0.90, "auc": 0.94}}]
    line = gap_line("breastmnist", runs)  # best published: ACC 0.863 (ResNet-18 28), AUC 0.919 (AutoML)
    assert "mean of 2 seeds" in line
    assert "ACC -0.013 against ResNet-18 (28) (0.863)" in line
    assert "AUC +0.001 against Google AutoML Vision (0.919)" in line
