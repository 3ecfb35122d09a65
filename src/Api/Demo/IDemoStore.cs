namespace OrleansIdempotency.Api.Demo;

/// <summary>
/// Where the demo keeps its side effects. Each write records the <c>Idempotency-Key</c> that caused it, so tests
/// can count side effects per key.
/// </summary>
public interface IDemoStore
{
    /// <summary>Stores an order and records its charge with the payment gateway stand-in.</summary>
    Task AddOrderAsync(string user, string? requestKey, Order order, CancellationToken cancellationToken);

    Task<IReadOnlyList<Order>> GetOrdersAsync(string user, CancellationToken cancellationToken);

    Task<Order?> GetOrderAsync(string user, string id, CancellationToken cancellationToken);

    Task AddPaymentAsync(string user, string? requestKey, Payment payment, CancellationToken cancellationToken);

    Task<IReadOnlyList<Payment>> GetPaymentsAsync(string user, CancellationToken cancellationToken);

    /// <summary>How many charges the payment gateway stand-in has recorded for <paramref name="user"/>.</summary>
    Task<int> CountChargesAsync(string user, CancellationToken cancellationToken);
}
