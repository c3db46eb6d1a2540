//! Credit-based flow control, both directions of one link.
//!
//! - Each side posts `credits + 2` receives. A data frame (SEND or WRITE WITH IMMEDIATE)
//!   consumes one of the `credits`; the sender holds a data credit for it until the receiver
//!   has released the frame and reposted its receive, and says so.
//! - Credits come back in the immediate data of SEND frames going the other way, or in a
//!   control message. Control messages are never delivered to the sink and never need credits:
//!   a side sends one only as a *request* (at most one outstanding, when its credits run low or
//!   it needs ring space) or as the *reply* to the peer's request (at most one per request).
//!   The two spare receives are for exactly these two messages. The receiver reposts a control
//!   receive before it sends anything, so a reply proves the request's receive is back, and
//!   the next request (sent only after the reply arrived) proves the reply's receive is back.
//! - The receiver replies as soon as it has something to give (credits or ring space), so a
//!   request never spins: it waits for the receiving application to release a frame.
#![forbid(unsafe_code)]

/// A peer broke the credit protocol (input from outside: a typed error, never an assertion).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreditError(pub String);

impl std::fmt::Display for CreditError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The sending side: data credits for frames to the peer, and our one credit request.
#[derive(Debug)]
pub struct SendWindow {
    window: u32,
    available: u32,
    low_water: u32,
    request_outstanding: bool,
}

impl SendWindow {
    /// `window` is the peer's advertised data credits (at least 1, checked at the handshake).
    pub fn new(window: u32) -> SendWindow {
        assert!(window >= 1, "a send window needs at least one credit");
        SendWindow { window, available: window, low_water: window / 2, request_outstanding: false }
    }

    pub fn available(&self) -> u32 {
        self.available
    }

    /// Takes one credit for a data frame; false when none is left.
    pub fn try_take(&mut self) -> bool {
        if self.available == 0 {
            return false;
        }
        self.available -= 1;
        true
    }

    /// Credits the peer returned. More than are out is a protocol violation.
    pub fn grant(&mut self, credits: u32) -> Result<(), CreditError> {
        let out = self.window - self.available;
        if credits > out {
            return Err(CreditError(format!(
                "peer returned {credits} credits but only {out} of {} were in use",
                self.window
            )));
        }
        self.available += credits;
        Ok(())
    }

    /// Whether to send a credit request now: none outstanding, and credits are at or below
    /// half the window or the peer's ring is short of space.
    pub fn wants_request(&self, ring_short: bool) -> bool {
        !self.request_outstanding && (self.available <= self.low_water || ring_short)
    }

    pub fn request_sent(&mut self) {
        assert!(!self.request_outstanding, "a second credit request while one is outstanding");
        self.request_outstanding = true;
    }

    pub fn reply_received(&mut self) -> Result<(), CreditError> {
        if !self.request_outstanding {
            return Err(CreditError("peer sent a credit reply with no request outstanding".into()));
        }
        self.request_outstanding = false;
        Ok(())
    }
}

/// The receiving side: data frames the peer has outstanding here, credits owed back to it,
/// and its pending request.
#[derive(Debug)]
pub struct ReturnLedger {
    window: u32,
    /// Frames received and not yet released by the application.
    held: u32,
    /// Frames released (their receives reposted) whose credits the peer does not have yet.
    owed: u32,
    request_pending: bool,
}

impl ReturnLedger {
    /// `window` is the data credits this side advertised.
    pub fn new(window: u32) -> ReturnLedger {
        ReturnLedger { window, held: 0, owed: 0, request_pending: false }
    }

    #[cfg(test)]
    pub fn held(&self) -> u32 {
        self.held
    }

    #[cfg(test)]
    pub fn owed(&self) -> u32 {
        self.owed
    }

    /// A data frame arrived. One beyond the advertised window is a protocol violation.
    pub fn frame_received(&mut self) -> Result<(), CreditError> {
        if self.held + self.owed >= self.window {
            return Err(CreditError(format!(
                "peer sent a data frame beyond its {} credits ({} held, {} owed back)",
                self.window, self.held, self.owed
            )));
        }
        self.held += 1;
        Ok(())
    }

    /// The application released a frame and its receive was reposted.
    pub fn frame_released(&mut self) {
        assert!(self.held > 0, "released more frames than were received");
        self.held -= 1;
        self.owed += 1;
    }

    /// Takes up to `max` owed credits to send back.
    pub fn take_owed(&mut self, max: u32) -> u32 {
        let credits = self.owed.min(max);
        self.owed -= credits;
        credits
    }

    pub fn request_received(&mut self) -> Result<(), CreditError> {
        if self.request_pending {
            return Err(CreditError("peer sent a second credit request before our reply".into()));
        }
        self.request_pending = true;
        Ok(())
    }

    /// A reply is due once there is something to give back.
    pub fn reply_due(&self, ring_news: bool) -> bool {
        self.request_pending && (self.owed > 0 || ring_news)
    }

    pub fn reply_sent(&mut self) {
        assert!(self.request_pending, "a reply with no request pending");
        self.request_pending = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sender_stops_after_exactly_the_window_and_resumes_on_grant() {
        let mut window = SendWindow::new(4);
        for _ in 0..4 {
            assert!(window.try_take());
        }
        assert!(!window.try_take());
        window.grant(3).unwrap();
        assert_eq!(window.available(), 3);
        assert!(window.grant(2).is_err(), "more credits than were in use");
    }

    #[test]
    fn one_request_outstanding_and_only_when_low() {
        let mut window = SendWindow::new(4);
        assert!(!window.wants_request(false));
        assert!(window.wants_request(true), "ring short asks even with credits left");
        window.try_take();
        window.try_take();
        assert!(window.wants_request(false), "at half the window");
        window.request_sent();
        assert!(!window.wants_request(true));
        window.reply_received().unwrap();
        assert!(window.reply_received().is_err());
    }

    #[test]
    fn receiver_detects_a_peer_beyond_its_credits() {
        let mut ledger = ReturnLedger::new(2);
        ledger.frame_received().unwrap();
        ledger.frame_received().unwrap();
        assert!(ledger.frame_received().is_err());
        ledger.frame_released();
        assert!(ledger.frame_received().is_err(), "an owed credit is still the peer's frame");
        assert_eq!(ledger.take_owed(10), 1);
        ledger.frame_received().unwrap();
    }

    #[test]
    fn reply_waits_for_something_to_give() {
        let mut ledger = ReturnLedger::new(2);
        ledger.request_received().unwrap();
        assert!(ledger.request_received().is_err());
        assert!(!ledger.reply_due(false));
        assert!(ledger.reply_due(true));
        ledger.frame_received().unwrap();
        ledger.frame_released();
        assert!(ledger.reply_due(false));
        ledger.reply_sent();
        assert!(!ledger.reply_due(true));
    }

    #[derive(Debug, Clone)]
    enum Step {
        Send,
        Deliver,
        Release,
        Exchange,
    }

    proptest! {
        /// The two halves together, driven in any order: the sender never has more frames
        /// outstanding than the window, the receiver never sees a violation, and once the
        /// receiver has released everything and replied, every credit is back.
        #[test]
        fn credits_are_conserved(window in 1u32..64, steps in proptest::collection::vec(
            prop_oneof![Just(Step::Send), Just(Step::Deliver), Just(Step::Release), Just(Step::Exchange)], 0..400)) {
            let mut sender = SendWindow::new(window);
            let mut receiver = ReturnLedger::new(window);
            let mut in_flight = 0u32;
            for step in steps {
                match step {
                    Step::Send => if sender.try_take() { in_flight += 1 },
                    Step::Deliver => if in_flight > 0 { in_flight -= 1; receiver.frame_received().unwrap() },
                    Step::Release => if receiver.held() > 0 { receiver.frame_released() },
                    Step::Exchange => {
                        if sender.wants_request(false) { sender.request_sent(); receiver.request_received().unwrap() }
                        if receiver.reply_due(false) {
                            let credits = receiver.take_owed(u32::MAX);
                            receiver.reply_sent();
                            sender.grant(credits).unwrap();
                            sender.reply_received().unwrap();
                        }
                    }
                }
                prop_assert!(window - sender.available() == in_flight + receiver.held() + receiver.owed());
            }
            while in_flight > 0 { in_flight -= 1; receiver.frame_received().unwrap() }
            while receiver.held() > 0 { receiver.frame_released() }
            let credits = receiver.take_owed(u32::MAX);
            sender.grant(credits).unwrap();
            prop_assert_eq!(sender.available(), window);
        }
    }
}
