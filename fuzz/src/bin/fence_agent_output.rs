//! What a fence-agents executable prints: the first byte picks the action and exit code.
use herd::fence::agent::Action;
use herd::fence::external::interpret;

fn main() {
    afl::fuzz!(|data: &[u8]| {
        let Some((&first, rest)) = data.split_first() else { return };
        let action = [Action::Status, Action::Off, Action::On][usize::from(first % 3)];
        let code = match first / 3 % 4 {
            0 => None,
            1 => Some(0),
            2 => Some(2),
            _ => Some(1),
        };
        let _ = interpret(action, code, &String::from_utf8_lossy(rest));
    });
}
