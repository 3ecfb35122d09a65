using System.ComponentModel.DataAnnotations;

namespace OrleansIdempotency.Api.Demo;

/// <summary>A line of an order.</summary>
public sealed record OrderItem([Required, MinLength(1), Printable] string Sku, [Range(1, 10_000)] int Quantity);

/// <summary>The body of <c>POST /orders</c>.</summary>
public sealed record CreateOrderRequest(
    [Required, MinLength(1), Printable] string CustomerId,
    [Range(typeof(decimal), "0.01", "1000000"), Cents] decimal Amount,
    [Required, MinLength(1), NoNullElements] IReadOnlyList<OrderItem> Items);

/// <summary>An order, as stored and returned.</summary>
public sealed record Order(string Id, string CustomerId, decimal Amount, IReadOnlyList<OrderItem> Items, DateTimeOffset CreatedAt);

/// <summary>The body of <c>POST /payments</c>.</summary>
public sealed record CreatePaymentRequest(decimal Amount, string? Currency);

/// <summary>A payment, as stored and returned.</summary>
public sealed record Payment(string Id, decimal Amount, string Currency, DateTimeOffset CreatedAt);

/// <summary>The demo's clock as its store keeps time: to the microsecond, as PostgreSQL does, so a record read back equals its replay.</summary>
internal static class DemoClock
{
    public static DateTimeOffset Now(TimeProvider time)
    {
        var now = time.GetUtcNow();
        return now.AddTicks(-(now.Ticks % (TimeSpan.TicksPerMillisecond / 1000)));
    }
}
