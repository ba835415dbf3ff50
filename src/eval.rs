//! Segmentation accuracy against a ground truth: per-class IoU and Dice, the confusion
//! matrix, mean IoU (`volfuse eval`, `volfuse demo`).
//!
//! IoU_k = TP / (TP + FP + FN) and Dice_k = 2 TP / (2 TP + FP + FN). A class that appears
//! neither in the prediction nor in the truth has no score (`None`) and is left out of the
//! means; a class present in only one of them scores 0.

use crate::error::{Error, Result};

/// Accuracy of one labelling.
#[derive(Clone, Debug, PartialEq)]
pub struct Scores {
    /// `confusion[t][p]`: voxels of true class `t` predicted as `p`.
    pub confusion: Vec<Vec<u64>>,
    pub iou: Vec<Option<f64>>,
    pub dice: Vec<Option<f64>>,
}

impl Scores {
    pub fn classes(&self) -> usize {
        self.confusion.len()
    }
    /// Mean IoU over the classes that have a score.
    pub fn mean_iou(&self) -> Option<f64> {
        mean(&self.iou)
    }
    pub fn mean_dice(&self) -> Option<f64> {
        mean(&self.dice)
    }
    /// Fraction of voxels labelled correctly.
    pub fn accuracy(&self) -> f64 {
        let total: u64 = self.confusion.iter().flatten().sum();
        let right: u64 = (0..self.classes()).map(|k| self.confusion[k][k]).sum();
        right as f64 / total.max(1) as f64
    }
}

fn mean(v: &[Option<f64>]) -> Option<f64> {
    let s: Vec<f64> = v.iter().flatten().copied().collect();
    (!s.is_empty()).then(|| s.iter().sum::<f64>() / s.len() as f64)
}

/// Scores `pred` against `truth` (same length, label values). `classes` is at least one
/// more than the largest label found in either (pass 0 to take exactly that).
pub fn score(pred: &[u16], truth: &[u16], classes: usize) -> Result<Scores> {
    if pred.len() != truth.len() {
        return Err(Error::Invalid(format!(
            "the prediction has {} voxels but the truth has {}; they must have the same shape",
            pred.len(),
            truth.len()
        )));
    }
    let top = pred
        .iter()
        .chain(truth)
        .copied()
        .max()
        .map_or(0, |m| m as usize + 1);
    let k = classes.max(top).max(1);
    if k > 4096 {
        return Err(Error::Invalid(format!(
            "labels go up to {}; eval supports at most 4096 classes (are these label volumes?)",
            k - 1
        )));
    }
    let mut confusion = vec![vec![0u64; k]; k];
    for (p, t) in pred.iter().zip(truth) {
        confusion[*t as usize][*p as usize] += 1;
    }
    let mut iou = Vec::with_capacity(k);
    let mut dice = Vec::with_capacity(k);
    for c in 0..k {
        let tp = confusion[c][c];
        let fn_: u64 = confusion[c].iter().sum::<u64>() - tp;
        let fp: u64 = (0..k).map(|t| confusion[t][c]).sum::<u64>() - tp;
        if tp + fp + fn_ == 0 {
            iou.push(None);
            dice.push(None);
        } else {
            iou.push(Some(tp as f64 / (tp + fp + fn_) as f64));
            dice.push(Some(2.0 * tp as f64 / (2 * tp + fp + fn_) as f64));
        }
    }
    Ok(Scores {
        confusion,
        iou,
        dice,
    })
}

fn fmt(v: Option<f64>) -> String {
    v.map_or("   -  ".to_string(), |x| format!("{x:6.3}"))
}

fn name(names: &[&str], k: usize) -> String {
    names.get(k).map_or(format!("class {k}"), |s| s.to_string())
}

/// A table of IoU and Dice per class for one or more labellings side by side.
pub fn table(names: &[&str], runs: &[(&str, &Scores)]) -> String {
    let k = runs.iter().map(|(_, s)| s.classes()).max().unwrap_or(0);
    let mut out = format!("{:<16}", "class");
    for (label, _) in runs {
        out += &format!(" | {:^15}", label);
    }
    out += "\n";
    out += &format!("{:<16}", "");
    for _ in runs {
        out += " |    IoU   Dice ";
    }
    out += "\n";
    let row = |title: String, f: &dyn Fn(&Scores) -> (Option<f64>, Option<f64>)| {
        let mut s = format!("{title:<16}");
        for (_, sc) in runs {
            let (a, b) = f(sc);
            s += &format!(" | {} {}", fmt(a), fmt(b));
        }
        s + "\n"
    };
    for c in 0..k {
        out += &row(name(names, c), &|s: &Scores| {
            (
                s.iou.get(c).copied().flatten(),
                s.dice.get(c).copied().flatten(),
            )
        });
    }
    out += &row("mean".into(), &|s: &Scores| (s.mean_iou(), s.mean_dice()));
    out
}

/// The confusion matrix as text (rows: truth, columns: prediction).
pub fn confusion_text(names: &[&str], s: &Scores) -> String {
    let k = s.classes();
    let mut out = format!("{:<16}", "truth \\ pred");
    for c in 0..k {
        out += &format!(" {:>12}", name(names, c));
    }
    out += "\n";
    for t in 0..k {
        out += &format!("{:<16}", name(names, t));
        for p in 0..k {
            out += &format!(" {:>12}", s.confusion[t][p]);
        }
        out += "\n";
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_made_scores() {
        // truth: 0 0 0 1 1 2 ; pred: 0 0 1 1 1 0
        let truth = [0u16, 0, 0, 1, 1, 2];
        let pred = [0u16, 0, 1, 1, 1, 0];
        let s = score(&pred, &truth, 0).unwrap();
        assert_eq!(
            s.confusion,
            vec![vec![2, 1, 0], vec![0, 2, 0], vec![1, 0, 0]]
        );
        // class 0: tp 2, fn 1, fp 1 → IoU 2/4, Dice 4/6
        assert_eq!(s.iou[0], Some(0.5));
        assert!((s.dice[0].unwrap() - 4.0 / 6.0).abs() < 1e-12);
        // class 1: tp 2, fp 1 → IoU 2/3, Dice 4/5
        assert!((s.iou[1].unwrap() - 2.0 / 3.0).abs() < 1e-12);
        assert!((s.dice[1].unwrap() - 0.8).abs() < 1e-12);
        // class 2: missed entirely
        assert_eq!(s.iou[2], Some(0.0));
        assert!((s.mean_iou().unwrap() - (0.5 + 2.0 / 3.0) / 3.0).abs() < 1e-12);
        assert!((s.accuracy() - 4.0 / 6.0).abs() < 1e-12);
    }

    #[test]
    fn absent_classes_have_no_score_and_perfect_is_one() {
        let t = [0u16, 3, 3, 0];
        let s = score(&t, &t, 5).unwrap();
        assert_eq!(s.iou, vec![Some(1.0), None, None, Some(1.0), None]);
        assert_eq!(s.mean_iou(), Some(1.0));
        assert_eq!(s.mean_dice(), Some(1.0));
        let text = table(&["bg", "a", "b", "c"], &[("x", &s), ("y", &s)]);
        assert!(text.contains("bg") && text.contains("class 4") && text.contains("1.000"));
    }

    #[test]
    fn mismatched_lengths_are_an_error() {
        let e = score(&[0, 1], &[0], 0).unwrap_err().to_string();
        assert!(e.contains("same shape"), "{e}");
    }
}
