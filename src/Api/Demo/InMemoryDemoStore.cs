using System.Collections.Concurrent;

namespace OrleansIdempotency.Api.Demo;

/// <summary>The demo's store when no PostgreSQL is configured: per process, gone on restart.</summary>
internal sealed class InMemoryDemoStore : IDemoStore
{
    private readonly ConcurrentDictionary<string, ConcurrentQueue<Order>> orders = new();
    private readonly ConcurrentDictionary<string, ConcurrentQueue<Payment>> payments = new();
    private readonly ConcurrentDictionary<string, int> charges = new();

    public Task AddOrderAsync(string user, string? requestKey, Order order, CancellationToken cancellationToken)
    {
        orders.GetOrAdd(user, _ => new()).Enqueue(order);
        charges.AddOrUpdate(user, 1, (_, count) => count + 1);
        return Task.CompletedTask;
    }

    public Task<IReadOnlyList<Order>> GetOrdersAsync(string user, CancellationToken cancellationToken) =>
        Task.FromResult<IReadOnlyList<Order>>(orders.TryGetValue(user, out var list) ? [.. list] : []);

    public Task<Order?> GetOrderAsync(string user, string id, CancellationToken cancellationToken) =>
        Task.FromResult(orders.TryGetValue(user, out var list) ? list.FirstOrDefault(o => o.Id == id) : null);

    public Task AddPaymentAsync(string user, string? requestKey, Payment payment, CancellationToken cancellationToken)
    {
        payments.GetOrAdd(user, _ => new()).Enqueue(payment);
        return Task.CompletedTask;
    }

    public Task<IReadOnlyList<Payment>> GetPaymentsAsync(string user, CancellationToken cancellationToken) =>
        Task.FromResult<IReadOnlyList<Payment>>(payments.TryGetValue(user, out var list) ? [.. list] : []);

    public Task<int> CountChargesAsync(string user, CancellationToken cancellationToken) =>
        Task.FromResult(charges.GetValueOrDefault(user));
}
