use super::*;

const T0: Duration = Duration::ZERO;

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn peer_open(asn: u32, hold: u16) -> Open {
    Open {
        version: 4,
        my_as: u16::try_from(asn).unwrap_or(AS_TRANS),
        hold_time: hold,
        bgp_id: Ipv4Addr::new(198, 18, 0, 12),
        capabilities: vec![Capability::FourOctetAs(asn)],
    }
}

fn cfg() -> SessionConfig {
    SessionConfig {
        peer_as: Some(64512),
        router_id: Ipv4Addr::new(198, 18, 0, 11),
        ..Default::default()
    }
}

/// Drives a session to `target` through the normal path.
fn session_in(target: State) -> Session {
    let mut s = Session::new(cfg());
    for (state, ev) in [
        (State::Connect, Event::Start),
        (State::OpenSent, Event::TcpConnected),
        (
            State::OpenConfirm,
            Event::Received(Message::Open(peer_open(64512, 30))),
        ),
        (State::Established, Event::Received(Message::Keepalive)),
    ] {
        if s.state() == target {
            break;
        }
        s.handle(T0, ev);
        assert_eq!(s.state(), state);
    }
    assert_eq!(s.state(), target);
    s
}

fn sends_notification(actions: &[Action], code: u8, subcode: u8) -> bool {
    actions.iter().any(|a| matches!(a, Action::Send(Message::Notification(n)) if n.code == code && n.subcode == subcode))
}

#[test]
fn normal_session_comes_up_with_negotiated_hold_time() {
    let mut s = Session::new(cfg());
    assert_eq!(s.handle(T0, Event::Start), vec![Action::Connect]);
    let a = s.handle(T0, Event::TcpConnected);
    assert!(
        matches!(&a[..], [Action::Send(Message::Open(o))] if o.hold_time == 90 && o.asn() == 64512)
    );
    let a = s.handle(T0, Event::Received(Message::Open(peer_open(64512, 30))));
    assert_eq!(a, vec![Action::Send(Message::Keepalive)]);
    assert_eq!(
        s.hold_time(),
        secs(30),
        "hold time negotiation uses the minimum"
    );
    let a = s.handle(T0, Event::Received(Message::Keepalive));
    assert!(matches!(&a[..], [Action::Up { ctx, .. }] if ctx.four_octet_as));
    assert_eq!(s.state(), State::Established);
}

#[test]
fn keepalives_every_third_of_the_hold_time_and_expiry_sends_4_0() {
    let mut s = session_in(State::Established);
    assert_eq!(s.next_deadline(), Some(secs(10)));
    assert_eq!(
        s.poll_timers(secs(10)),
        vec![Action::Send(Message::Keepalive)]
    );
    // A KEEPALIVE from the peer at 20 s pushes the hold timer to 50 s.
    s.handle(secs(20), Event::Received(Message::Keepalive));
    assert!(s
        .poll_timers(secs(45))
        .iter()
        .all(|a| !matches!(a, Action::Down { .. })));
    let a = s.poll_timers(secs(50));
    assert!(sends_notification(&a, err::HOLD_TIMER_EXPIRED, 0), "{a:?}");
    assert!(a.iter().any(|x| matches!(x, Action::Down { .. })));
    assert_eq!(s.state(), State::Idle);
    // ... and starts again by itself.
    assert_eq!(
        s.poll_timers(secs(50) + s.cfg.connect_retry),
        vec![Action::Connect]
    );
}

#[test]
fn hold_time_zero_means_no_keepalives() {
    let mut s = session_in(State::OpenSent);
    s.handle(T0, Event::Received(Message::Open(peer_open(64512, 0))));
    s.handle(T0, Event::Received(Message::Keepalive));
    assert_eq!(s.state(), State::Established);
    assert_eq!(s.next_deadline(), None);
}

#[test]
fn wrong_peer_as_gets_open_error_2_2() {
    let mut s = session_in(State::OpenSent);
    let a = s.handle(T0, Event::Received(Message::Open(peer_open(65000, 90))));
    assert!(sends_notification(&a, err::OPEN, err::BAD_PEER_AS));
    assert_eq!(s.state(), State::Idle);
}

/// (state, event) -> (next state, NOTIFICATION code/subcode sent).
type Case = (State, Event, State, Option<(u8, u8)>);

/// RFC 4271 §8.2.2 as a table.
#[test]
fn event_state_table() {
    let update = Message::Update(Update::default());
    let notif = Message::Notification(Notification {
        code: 6,
        subcode: 2,
        data: vec![],
    });
    let malformed = DecodeError {
        code: 1,
        subcode: 2,
        data: vec![],
        reason: "test",
    };
    let cases: Vec<Case> = vec![
        (State::Connect, Event::TcpFailed, State::Active, None),
        (State::Connect, Event::Stop, State::Idle, None),
        (State::Active, Event::TcpConnected, State::OpenSent, None),
        (
            State::OpenSent,
            Event::Received(Message::Keepalive),
            State::Idle,
            Some((5, 1)),
        ),
        (
            State::OpenSent,
            Event::Received(update.clone()),
            State::Idle,
            Some((5, 1)),
        ),
        (State::OpenSent, Event::TcpFailed, State::Idle, None),
        (
            State::OpenSent,
            Event::Received(notif.clone()),
            State::Idle,
            None,
        ),
        (
            State::OpenSent,
            Event::Malformed(malformed.clone()),
            State::Idle,
            Some((1, 2)),
        ),
        (State::OpenSent, Event::Stop, State::Idle, Some((6, 2))),
        (
            State::OpenConfirm,
            Event::Received(update.clone()),
            State::Idle,
            Some((5, 2)),
        ),
        (
            State::OpenConfirm,
            Event::Received(Message::Open(peer_open(64512, 90))),
            State::Idle,
            Some((5, 2)),
        ),
        (
            State::OpenConfirm,
            Event::Received(notif.clone()),
            State::Idle,
            None,
        ),
        (
            State::Established,
            Event::Received(update),
            State::Established,
            None,
        ),
        (
            State::Established,
            Event::Received(Message::Open(peer_open(64512, 90))),
            State::Idle,
            Some((5, 3)),
        ),
        (
            State::Established,
            Event::Received(notif),
            State::Idle,
            None,
        ),
        (
            State::Established,
            Event::Malformed(malformed),
            State::Idle,
            Some((1, 2)),
        ),
        (State::Established, Event::TcpFailed, State::Idle, None),
        (State::Established, Event::Stop, State::Idle, Some((6, 2))),
    ];
    for (from, ev, to, notify) in cases {
        let mut s = if from == State::Active {
            let mut s = Session::new(SessionConfig {
                passive: true,
                ..cfg()
            });
            s.handle(T0, Event::Start);
            s
        } else {
            session_in(from)
        };
        let label = format!("{from:?} + {ev:?}");
        let a = s.handle(T0, ev);
        assert_eq!(s.state(), to, "{label}: {a:?}");
        match notify {
            Some((c, sc)) => assert!(sends_notification(&a, c, sc), "{label}: {a:?}"),
            None => assert!(
                !a.iter()
                    .any(|x| matches!(x, Action::Send(Message::Notification(_)))),
                "{label}: {a:?}"
            ),
        }
        if from == State::Established && to == State::Idle {
            assert!(
                a.iter().any(|x| matches!(x, Action::Down { .. })),
                "{label}"
            );
        }
    }
}

#[test]
fn connect_retry_timer_retries() {
    let mut s = Session::new(cfg());
    s.handle(T0, Event::Start);
    s.handle(T0, Event::TcpFailed);
    assert_eq!(s.state(), State::Active);
    assert_eq!(s.poll_timers(s.cfg.connect_retry), vec![Action::Connect]);
    assert_eq!(s.state(), State::Connect);
}

#[test]
fn collision_keeps_the_connection_of_the_higher_identifier() {
    let low = Ipv4Addr::new(198, 18, 0, 11);
    let high = Ipv4Addr::new(198, 18, 0, 12);
    assert!(!keep_our_connection(low, high));
    assert!(keep_our_connection(high, low));
}

#[test]
fn a_flapping_peer_waits_longer_each_time_until_a_stable_session() {
    let mut s = Session::new(SessionConfig {
        connect_retry: secs(1),
        idle_hold_max: secs(8),
        stable_after: secs(60),
        ..cfg()
    });
    let notification = |s: &mut Session, now| {
        s.handle(
            now,
            Event::Received(Message::Notification(Notification {
                code: err::CEASE,
                subcode: 0,
                data: vec![],
            })),
        )
    };
    // The peer answers every OPEN with a NOTIFICATION: 1, 2, 4, 8, 8 s before the next try.
    let mut now = T0;
    let mut waits = Vec::new();
    s.handle(now, Event::Start);
    for _ in 0..5 {
        s.handle(now, Event::TcpConnected);
        notification(&mut s, now);
        assert_eq!(s.state(), State::Idle);
        let d = s.damping().expect("damping");
        assert!(d.reason.contains("NOTIFICATION 6/0"), "{d:?}");
        let next = s.next_deadline().expect("restart");
        waits.push(next - now);
        now = next;
        assert!(s.poll_timers(now).contains(&Action::Connect));
    }
    assert_eq!(waits, [secs(1), secs(2), secs(4), secs(8), secs(8)]);
    // A session that stays up for a minute resets the count.
    s.handle(now, Event::TcpConnected);
    s.handle(now, Event::Received(Message::Open(peer_open(64512, 90))));
    s.handle(now, Event::Received(Message::Keepalive));
    assert_eq!(s.state(), State::Established);
    now += secs(61);
    s.handle(now, Event::TcpFailed);
    assert_eq!(s.damping().map(|d| d.resets), Some(1));
    assert_eq!(s.next_deadline(), Some(now + secs(1)));
}

#[test]
fn a_connection_from_the_peer_while_idle_starts_the_session_on_it() {
    let mut s = Session::new(cfg());
    let Incoming::Accept {
        cease_current,
        actions,
    } = s.incoming(T0, Some(Ipv4Addr::new(198, 18, 0, 12)))
    else {
        panic!("refused while idle");
    };
    assert_eq!(cease_current, None);
    assert!(
        matches!(&actions[..], [Action::Send(Message::Open(_))]),
        "no connection of our own, an OPEN on theirs: {actions:?}"
    );
    assert_eq!(s.state(), State::OpenSent);
}

#[test]
fn an_established_session_refuses_a_second_connection() {
    let mut s = session_in(State::Established);
    assert_eq!(s.incoming(T0, None), Incoming::Refuse);
    assert_eq!(s.state(), State::Established);
}

#[test]
fn a_collision_keeps_the_connection_of_the_higher_identifier() {
    // Ours is 198.18.0.11. A peer with a lower identifier: our connection stays.
    let mut s = session_in(State::OpenSent);
    assert_eq!(
        s.incoming(T0, Some(Ipv4Addr::new(198, 18, 0, 2))),
        Incoming::Refuse
    );
    // A higher one: ours is ceased (6/7) and the session starts over on theirs, without
    // counting a reset.
    let mut s = session_in(State::OpenConfirm);
    let Incoming::Accept {
        cease_current,
        actions,
    } = s.incoming(secs(1), None)
    else {
        panic!("the peer's OPEN said 198.18.0.12, higher than ours");
    };
    assert_eq!(
        cease_current.map(|n| (n.code, n.subcode)),
        Some((err::CEASE, err::COLLISION_RESOLUTION))
    );
    assert!(
        matches!(&actions[..], [Action::Send(Message::Open(_))]),
        "{actions:?}"
    );
    assert_eq!(s.state(), State::OpenSent);
    assert_eq!(s.damping(), None);
}
