//! icmp-guard's inbound ICMP guard: EC2-044 enforced on the node itself.
//!
//! A separate object from the socket programs, so that nothing of it loads while no
//! `KubeArmorNetworkPolicy` asks for it and the socket programs' verifier budget is untouched.
//! - `guard_xdp` (and `guard_xdp_frags`, the same code for multi-buffer frames): the ingress
//!   decision at XDP, native where the driver has it, generic otherwise;
//! - `guard_tc_ingress`: the same decision at TC ingress, where XDP cannot attach;
//! - `guard_tc_egress`: records the node's own flows for the ingress side.
//!
//! Non-ICMP packets leave after the ethertype and the protocol byte.
#![no_std]
#![no_main]

mod flows;
mod ingress;
mod maps;
mod packet;

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC, xdp_action},
    helpers::bpf_xdp_get_buff_len,
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use icmp_guard_common::guard::{counter, hook};

use crate::packet::Pkt;

#[inline(always)]
fn xdp_packet(ctx: &XdpContext, frame_len: u32) -> Pkt {
    Pkt {
        data: ctx.data(),
        end: ctx.data_end(),
        frame_len,
        ifindex: unsafe { (*ctx.ctx).ingress_ifindex },
    }
}

#[xdp]
pub fn guard_xdp(ctx: XdpContext) -> u32 {
    let p = xdp_packet(&ctx, (ctx.data_end() - ctx.data()) as u32);
    if ingress::ingress(&p, hook::XDP) {
        xdp_action::XDP_DROP
    } else {
        xdp_action::XDP_PASS
    }
}

#[xdp(frags)]
pub fn guard_xdp_frags(ctx: XdpContext) -> u32 {
    // Headers are in the first buffer; the whole frame's length is what the IP header's length
    // is checked against.
    let len = unsafe { bpf_xdp_get_buff_len(ctx.ctx) } as u32;
    let p = xdp_packet(&ctx, len);
    if ingress::ingress(&p, hook::XDP) {
        xdp_action::XDP_DROP
    } else {
        xdp_action::XDP_PASS
    }
}

/// Bytes of headers the TC program needs in the linear part of an skb: Ethernet with two VLAN
/// tags, IPv6 with extension headers, ICMP, and the inner header of an error.
const TC_HEADROOM: u32 = 256;

#[inline(always)]
fn tc_packet(ctx: &mut TcContext) -> Pkt {
    let len = ctx.len();
    let want = if len < TC_HEADROOM { len } else { TC_HEADROOM };
    if ((ctx.data_end() - ctx.data()) as u32) < want && ctx.pull_data(want).is_err() {
        maps::count(counter::PULL_FAILED);
    }
    Pkt {
        data: ctx.data(),
        end: ctx.data_end(),
        frame_len: len,
        ifindex: unsafe { (*ctx.skb.skb).ifindex },
    }
}

#[classifier]
pub fn guard_tc_ingress(mut ctx: TcContext) -> i32 {
    let p = tc_packet(&mut ctx);
    if ingress::ingress(&p, hook::TC) {
        TC_ACT_SHOT as i32
    } else {
        // Not "OK": let the programs after this one run too.
        TC_ACT_UNSPEC
    }
}

#[classifier]
pub fn guard_tc_egress(ctx: TcContext) -> i32 {
    let p = Pkt {
        data: ctx.data(),
        end: ctx.data_end(),
        frame_len: ctx.len(),
        ifindex: 0,
    };
    flows::record(&p);
    TC_ACT_UNSPEC
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
